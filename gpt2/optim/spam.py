"""AdamWSPAM: AdamW with SPAM's spike-aware clipping, periodic moment reset and LR re-warmup.

SPAM (Huang et al., ICLR 2025, arXiv 2501.06842) adds three things to Adam; this class adds
them to :class:`torch.optim.AdamW`, whose (fused or foreach) update does the Adam math, so
with every SPAM feature off it *is* ``torch.optim.AdamW``. Per call of :meth:`step`, with
``t`` the 1-based count of optimizer steps (the one counter; the earlier system advanced its
counter twice per step, so it reset every interval/2 steps and, with interval = warm-up, kept
the learning rate in a permanent re-warmup saw-tooth):

1. spike-aware clipping (``enable_clip``): every gradient element with
   ``|g| > sqrt(theta·(v + 1e-12))`` becomes ``sign(g)·sqrt(theta·(v + 1e-12))``, ``v`` being
   the second moment after the previous step (no clipping before the first step);
2. optional z-score spike detection (``spike_detection``, the earlier system's addition, off by
   default): when the global gradient norm is more than 2 standard deviations above the mean
   of the last (up to 100) norms, ``m *= 0.5`` and ``v *= 0.9``. It reads the norm back to the
   host once per step;
3. moment reset (``interval > 0``): at ``t = interval, 2·interval, …`` the first and second
   moments are zeroed, and so is AMSGrad's running maximum (keeping it would keep the old,
   large denominator and make the reset a no-op for the step size). Adam's step count, and so
   its bias correction, continues, as in the SPAM paper;
4. LR re-warmup: for ``warmup_steps`` steps from each reset step, every group's learning rate
   is multiplied by ``max(1e-3, ½(1 − cos πp))``, ``p = (t − t_reset) / warmup_steps``, inside
   this step (the training loop sets the plain schedule and knows nothing of it).

Every tensor operation is a ``torch._foreach_*`` call over a group's tensors, in chunks of at
most ``CHUNK_ELEMENTS`` elements to bound the temporary memory.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 25  # 32M elements (128 MiB of float32) of clipping thresholds at a time
SPIKE_HISTORY = 100  # gradient norms kept for the z-score
SPIKE_MIN_HISTORY = 10
SPIKE_Z = 2.0


def rewarmup_multiplier(step: int, warmup_until: int, warmup_steps: int) -> float:
    """LR multiplier at 1-based optimizer ``step`` when the last reset set ``warmup_until``.

    ``max(1e-3, ½(1 − cos πp))`` with ``p = (warmup_steps − (warmup_until − step)) / warmup_steps``
    while ``step < warmup_until``; 1 otherwise.
    """
    if warmup_steps <= 0 or step >= warmup_until:
        return 1.0
    p = (warmup_steps - (warmup_until - step)) / warmup_steps
    return max(1e-3, 0.5 * (1.0 - math.cos(math.pi * p)))


def _chunks(*lists: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into runs of at most CHUNK_ELEMENTS elements (>= 1 tensor each)."""
    start, size = 0, 0
    for i, t in enumerate(lists[0]):
        if size and size + t.numel() > CHUNK_ELEMENTS:
            yield tuple(lst[start:i] for lst in lists)
            start, size = i, 0
        size += t.numel()
    if start < len(lists[0]):
        yield tuple(lst[start:] for lst in lists)


class AdamWSPAM(torch.optim.AdamW):
    """AdamW plus SPAM (see the module docstring); defaults are the command line's.

    Args beyond :class:`torch.optim.AdamW`'s: ``theta`` clipping strength; ``interval`` steps
    between moment resets (0: never); ``warmup_steps`` LR re-warmup after each reset (0: none);
    ``enable_clip`` spike-aware clipping; ``spike_detection`` z-score soft reset.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        theta: float = 50.0,
        interval: int = 1000,
        warmup_steps: int = 100,
        enable_clip: bool = False,
        spike_detection: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if theta <= 0:
            raise ValueError(f"theta must be positive, got {theta}")
        if interval < 0 or warmup_steps < 0:
            raise ValueError("interval and warmup_steps must be >= 0")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            fused=fused,
        )
        self.theta = theta
        self.interval = interval
        self.warmup_steps = warmup_steps
        self.enable_clip = enable_clip
        self.spike_detection = spike_detection
        # The clipping reads the true (unscaled) gradients, so GradScaler must unscale them first
        # rather than hand the fused kernel a scale (fused AdamW sets this to True).
        self._step_supports_amp_scaling = False
        self.spam: dict[str, Any] = {"step": 0, "warmup_until": 0, "resets": 0, "spikes": 0, "norms": []}

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare_grads()
        s = self.spam
        s["step"] += 1
        t = s["step"]
        if self.enable_clip:
            self._clip_spikes()
        if self.spike_detection:
            self._detect_spike()
        if self.interval > 0 and t % self.interval == 0:
            self.reset_moments()
            s["resets"] += 1
            s["warmup_until"] = t + self.warmup_steps
        scale = self.lr_multiplier()
        if scale == 1.0:
            self._adam_step()
            return loss
        lrs = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * scale
        try:
            self._adam_step()
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
        return loss

    def _prepare_grads(self) -> None:
        """Hook for subclasses: adjust the gradients before anything reads them (AdamWPrune masks them)."""

    def _adam_step(self) -> None:
        """The AdamW update itself (torch's fused / foreach implementation)."""
        super().step()

    def lr_multiplier(self) -> float:
        """The re-warmup factor applied to every group's LR at the current step."""
        s = self.spam
        return rewarmup_multiplier(s["step"], s["warmup_until"], self.warmup_steps)

    # ------------------------------------------------------ SPAM components
    def _with_state(self, group: dict[str, Any], *keys: str) -> tuple[list[Tensor], ...]:
        """(grads, state[key] ...) of the group's parameters that have a gradient and that state."""
        out: tuple[list[Tensor], ...] = tuple([] for _ in range(len(keys) + 1))
        for p in group["params"]:
            st = self.state.get(p)
            if p.grad is None or not st or keys[0] not in st:
                continue
            out[0].append(p.grad)
            for lst, k in zip(out[1:], keys):
                lst.append(st[k])
        return out

    def _clip_spikes(self) -> None:
        """g <- clamp(g, -sqrt(theta·(v + 1e-12)), +sqrt(theta·(v + 1e-12))), where v exists."""
        for group in self.param_groups:
            grads, vs = self._with_state(group, "exp_avg_sq")
            for g, v in _chunks(grads, vs):
                thr = torch._foreach_add(v, 1e-12)
                torch._foreach_mul_(thr, self.theta)
                torch._foreach_sqrt_(thr)
                torch._foreach_minimum_(g, thr)
                torch._foreach_neg_(thr)
                torch._foreach_maximum_(g, thr)

    def _detect_spike(self) -> None:
        """z-score of the global gradient norm against the recent ones; soft-reset moments on a spike."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))  # host sync
        norms: list[float] = self.spam["norms"]
        if not math.isfinite(norm):
            return
        norms.append(norm)
        del norms[:-SPIKE_HISTORY]
        if len(norms) < SPIKE_MIN_HISTORY:
            return
        history = norms[:-1]
        mu, sigma = statistics.fmean(history), statistics.pstdev(history)
        if sigma > 0 and (norm - mu) / sigma > SPIKE_Z:
            for group in self.param_groups:
                _, ms, vs = self._with_state(group, "exp_avg", "exp_avg_sq")
                if ms:
                    torch._foreach_mul_(ms, 0.5)
                    torch._foreach_mul_(vs, 0.9)
            self.spam["spikes"] += 1

    def reset_moments(self) -> None:
        """Zero exp_avg, exp_avg_sq and (AMSGrad) max_exp_avg_sq of every parameter; keep Adam's step."""
        for group in self.param_groups:
            tensors = [
                st[k]
                for p in group["params"]
                if (st := self.state.get(p))
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                if k in st
            ]
            if tensors:
                torch._foreach_zero_(tensors)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["spam"] = {**self.spam, "norms": list(self.spam["norms"])}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        spam = state_dict.pop("spam", None)
        super().load_state_dict(state_dict)
        if spam is not None:
            self.spam.update({k: spam[k] for k in self.spam if k in spam})
            self.spam["norms"] = [float(x) for x in self.spam["norms"]]
