"""AdamWSPAM: AdamW with SPAM's spike-aware clipping, periodic moment reset and LR re-warmup.

SPAM (Huang et al., ICLR 2025, arXiv 2501.06842) adds three things to Adam; this class adds
them to :class:`torch.optim.AdamW`, whose (fused or foreach) update does the Adam math, so
with every SPAM feature off it *is* ``torch.optim.AdamW``. Per call of :meth:`step`, with
``t`` the 1-based count of optimizer steps (the one counter; each step counts once):

Steps 1 and 2 see the raw gradients: the trainer calls :meth:`prepare_gradients` before its
global gradient-norm clip, as the reference orders them (:meth:`step` runs them itself otherwise).

1. spike-aware clipping (``enable_clip``): every gradient element with
   ``|g| > sqrt(theta·(v + 1e-12))`` becomes ``sign(g)·sqrt(theta·(v + 1e-12))``, ``v`` being
   the second moment after the previous step (no clipping before the first step);
2. optional z-score spike detection (``spike_detection``, off by default): when the global
   gradient norm is more than 2 standard deviations above the mean of the last (up to 100)
   norms, ``m *= 0.5`` and ``v *= 0.9``. It reads the norm back to the host once per step;
3. moment reset (``interval > 0``): at ``t = interval, 2·interval, …`` the first and second
   moments are zeroed, and so is AMSGrad's running maximum (keeping it would keep the old,
   large denominator and make the reset a no-op for the step size). Adam's step count, and so
   its bias correction, continues, as in the SPAM paper;
4. LR re-warmup: for ``warmup_steps`` steps from each reset step, every group's learning rate
   is multiplied by ``max(1e-3, ½(1 − cos πp))``, ``p = (t − t_reset) / warmup_steps``, inside
   this step (the training loop sets the plain schedule and knows nothing of it).

``spam_variant="paper"`` is the SPAM authors' own code instead (``galore_torch/SPAM.py`` of
TianjinYellow/SPAM-Optimizer), where it differs from the reference this class follows by default:

- clipping runs inside :meth:`step`, after the trainer's global gradient-norm clip, compares
  ``g² > theta·v`` (no 1e-12), and is skipped in the first ``clip_settle`` (20) steps of the run
  and of every interval: only at ``t >= 20`` with ``t mod interval >= 20``;
- the re-warmup multiplier is ``0.01 + 0.99·½(1 − cos(π·c/(W + 1)))``, ``c = t − t_reset``, for
  ``c < W`` (the reference: ``max(1e-3, ½(1 − cos(π·c/W)))``), so its last value is below 1
  (0.2575 for W = 2, 0.9996 for W = 150) before it jumps to 1;
- the Adam update adds ``eps`` to the uncorrected ``√v`` (``p −= lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ)·m/(√v + eps)``,
  torch: ``m̂/(√v̂ + eps)``), with ``eps`` 1e-6 (:data:`PAPER_EPS`, the authors' default), and the
  weight decay comes after it, on the updated weights and at the un-warmed LR:
  ``p ← (1 − lr·wd)·(p − update)`` (torch: ``(1 − lr'·wd)·p − update`` with ``lr'`` re-warmed).

It has no AMSGrad and no device-side skipping (the trainer skips a non-finite step on the host).

Every tensor operation is a ``torch._foreach_*`` call over a group's tensors, in chunks of at
most ``CHUNK_ELEMENTS`` elements to bound the temporary memory. With ``compile_clip`` the clipping
is instead one ``torch.compile``'d function per group, which fuses it into one pass over each
gradient and its ``v`` with no temporary (GPT-2 124M on 2 CPU cores: 42 ms against 177 ms, plus
about 10 s of compilation once; equal to the eager form up to rounding, tested).

Skipping a step on the device. Like fused AdamW, a fused AdamWSPAM accepts GradScaler's
``found_inf`` attribute (a device scalar, 1.0 when the gradient is not finite): the Adam update is
then skipped by the kernel and the step does not count, so the trainer never has to read the
gradient norm back to the host. ``t`` still counts applied steps exactly: the host keeps an
upper bound (the calls), the device the number of skipped calls, and the host reads that number
back only at a step where SPAM could act on it: a reset step, the step right after it (did the
reset step apply?), the end of a re-warmup, and with clipping the second step (clipping needs
one applied step's ``v``). That is at most three reads per ``interval`` steps, none with
``interval = 0`` and no clipping. A reset on a step that may be skipped is applied on the device
(moments times ``found_inf``), and inside a re-warmup with skips not yet read back the LR
multiplier is computed on the device in float64 (a tensor LR, which the fused kernel takes).
Both give the trajectory of skipping the call on the host (tested to 1e-7 relative).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 25  # 32M elements (128 MiB of float32) of clipping thresholds at a time
VARIANTS = ("reference", "paper")  # the earlier system's SPAM, or the SPAM authors' code
PAPER_EPS = 1e-6  # the authors' Adam eps (their training script never sets it)
PAPER_CLIP_SETTLE = (
    20  # their grad_accu_steps: no clipping in the first 20 steps of the run and of each interval
)
CLIP_FLOOR = 1e-12  # the reference clips against v + 1e-12; the paper's code against v
SPIKE_HISTORY = 100  # gradient norms kept for the z-score
SPIKE_MIN_HISTORY = 10
SPIKE_Z = 2.0


def rewarmup_multiplier(step: int | Tensor, warmup_until: int, warmup_steps: int) -> float | Tensor:
    """LR multiplier at 1-based optimizer ``step`` when the last reset set ``warmup_until``.

    ``max(1e-3, ½(1 − cos πp))`` with ``p = (warmup_steps − (warmup_until − step)) / warmup_steps``
    while ``step < warmup_until``; 1 otherwise. ``step`` may be a float64 device scalar known to
    lie inside the window (the device-skip path: no host read); the result is then one too.
    """
    if isinstance(step, Tensor):
        p = (warmup_steps - (warmup_until - step)) / warmup_steps
        return (0.5 * (1.0 - torch.cos(math.pi * p))).clamp_min(1e-3)
    if warmup_steps <= 0 or step >= warmup_until:
        return 1.0
    p = (warmup_steps - (warmup_until - step)) / warmup_steps
    return max(1e-3, 0.5 * (1.0 - math.cos(math.pi * p)))


def paper_rewarmup_multiplier(step: int, warmup_until: int, warmup_steps: int) -> float:
    """The SPAM authors' LR multiplier at 1-based ``step`` when the last reset set ``warmup_until``.

    ``0.01 + 0.99·½(1 − cos(π·c/(W + 1)))`` with ``c = step − (warmup_until − W)`` the steps since
    the reset, while ``step < warmup_until``; 1 otherwise (their cosine decay of 0.99 over W + 1
    steps, cut off after W).
    """
    if warmup_steps <= 0 or step >= warmup_until:
        return 1.0
    c = step - (warmup_until - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1.0 - math.cos(math.pi * c / (warmup_steps + 1)))


def paper_clips(step: int, interval: int, settle: int = PAPER_CLIP_SETTLE) -> bool:
    """Whether the SPAM authors' code clips spikes at 1-based ``step``: not in the first ``settle``
    steps of the run, nor in the first ``settle`` steps after each reset."""
    return step >= settle and (interval <= 0 or step % interval >= settle)


def _clip_fused(grads: list[Tensor], vs: list[Tensor], theta: float, floor: float = CLIP_FLOOR) -> None:
    """The spike clipping in the form torch.compile fuses: one pass per tensor, no temporaries."""
    for g, v in zip(grads, vs):
        thr = torch.sqrt((v + floor) * theta)
        g.copy_(torch.maximum(torch.minimum(g, thr), -thr))


@functools.cache
def _clip_compiled() -> Callable[[list[Tensor], list[Tensor], float, float], None]:
    """:func:`_clip_fused` through torch.compile, built on first use (once per process)."""
    return torch.compile(_clip_fused)


def _chunks(*lists: list[Any]) -> Iterator[tuple[list[Any], ...]]:
    """Split parallel lists into runs of at most CHUNK_ELEMENTS elements of the first list's tensors
    (>= 1 tensor each)."""
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
    ``enable_clip`` spike-aware clipping; ``spike_detection`` z-score soft reset;
    ``compile_clip`` the clipping through torch.compile; ``spam_variant`` ``"reference"`` or the
    authors' ``"paper"``, with ``clip_settle`` its steps without clipping (module docstring).
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
        compile_clip: bool = False,
        spam_variant: str = "reference",
        clip_settle: int = PAPER_CLIP_SETTLE,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if theta <= 0:
            raise ValueError(f"theta must be positive, got {theta}")
        if interval < 0 or warmup_steps < 0:
            raise ValueError("interval and warmup_steps must be >= 0")
        if spam_variant not in VARIANTS:
            raise ValueError(f"unknown SPAM variant {spam_variant!r}; known: {', '.join(VARIANTS)}")
        if spam_variant == "paper":
            if amsgrad:
                raise ValueError("the SPAM authors' optimizer (spam_variant paper) has no AMSGrad")
            fused = False  # its own update (below), so no fused kernel and no device-side skipping
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
        self.compile_clip = compile_clip
        self.spam_variant = spam_variant
        self.clip_settle = clip_settle
        # The clipping reads the true (unscaled) gradients, so GradScaler must unscale them first
        # rather than hand the fused kernel a scale (fused AdamW sets this to True).
        self._step_supports_amp_scaling = False
        self.spam: dict[str, Any] = {"step": 0, "warmup_until": 0, "resets": 0, "spikes": 0, "norms": []}
        # Device-side skipping (see the module docstring): calls skipped since the last read-back,
        # whether any call since then could have been skipped, and a reset not yet known to apply.
        self._skipped: Tensor | None = None
        self._unsure = False
        self._pending_reset: int | None = None
        self._prepared = False  # prepare_gradients ran for the coming step

    @property
    def clips_gradients(self) -> bool:
        """Whether :meth:`prepare_gradients` changes gradients (its clipping makes inf finite, so a
        caller that skips non-finite steps must test the gradients before it); the paper variant
        clips inside :meth:`step` instead."""
        return self.enable_clip and self.spam_variant == "reference"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._prepared = False  # a step skipped after prepare_gradients: the next one prepares again
        super().zero_grad(set_to_none=set_to_none)

    @property
    def skips_on_device(self) -> bool:
        """Whether :meth:`step` takes ``found_inf``: fused, and no spike detection (it reads the host)."""
        return (
            bool(self.defaults.get("fused")) and not self.spike_detection and self.spam_variant == "reference"
        )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        s = self.spam
        if not self._prepared:
            self.prepare_gradients()
        self._prepared = False
        t = s["step"] + 1  # exact, or an upper bound while skips are not read back (then no event is due)
        if self.interval > 0 and t % self.interval == 0:
            if found_inf is None:
                self.reset_moments()
                s["resets"] += 1
                s["warmup_until"] = t + self.warmup_steps
            else:  # applies only if this step does; the next step reads back whether it did
                self.reset_moments(keep=found_inf)
                self._pending_reset = t
        if self.spam_variant == "paper":
            if self.enable_clip and paper_clips(t, self.interval, self.clip_settle):
                self._clip_spikes(floor=0.0)  # after the trainer's global clip, as in the authors' loop
            self._paper_adam_step(paper_rewarmup_multiplier(t, s["warmup_until"], self.warmup_steps))
            s["step"] = t
            return loss
        scale = self._lr_multiplier(t)
        lrs = [g["lr"] for g in self.param_groups]
        if isinstance(scale, Tensor):  # float64 like the host's value, rounded to fp32 like the kernel
            for g in self.param_groups:
                g["lr"] = (scale * g["lr"]).float()
        elif scale != 1.0:
            for g in self.param_groups:
                g["lr"] = g["lr"] * scale
        try:
            self._adam_step()
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
        s["step"] = t
        if found_inf is not None:
            if self._skipped is None:
                self._skipped = torch.zeros((), dtype=torch.float32, device=found_inf.device)
            self._skipped.add_(found_inf)
            self._unsure = True
        return loss

    def prepare_gradients(self) -> None:
        """SPAM's gradient steps 1-2: spike clipping, then spike detection, on the raw gradients.

        The reference runs them before the global gradient-norm clip, so the trainer calls this
        after unscaling and before clipping (:class:`~gpt2.trainer.step.TrainStep`); :meth:`step`
        calls it itself when nobody did.
        """
        self._settle(self.spam["step"] + 1)
        t = self.spam["step"] + 1
        if self.enable_clip and t >= 2 and self.spam_variant == "reference":  # (paper: in step)
            self._clip_spikes()  # (a skipped first call leaves v = 0: no clipping against it)
        if self.spike_detection:
            self._detect_spike()
        self._prepared = True

    def _settle(self, t_next: int, force: bool = False) -> None:
        """Read the device's skip count back when an event may be due at ``t_next`` (or ``force``)."""
        if not self._unsure:
            return
        due = (
            force
            or self._pending_reset is not None
            or (self.interval > 0 and t_next % self.interval == 0)
            or (self.warmup_steps > 0 and t_next == self.spam["warmup_until"])
            or (self.enable_clip and t_next == 2)  # clipping starts with the second applied step
        )
        if not due:
            return
        assert self._skipped is not None
        skipped = int(self._skipped.item())  # the one host read, at most a few per interval
        self._skipped.zero_()
        self._unsure = False
        s = self.spam
        s["step"] -= skipped
        if self._pending_reset is not None:
            if s["step"] >= self._pending_reset:  # the reset step applied: its re-warmup runs
                s["resets"] += 1
                s["warmup_until"] = self._pending_reset + self.warmup_steps
            self._pending_reset = None  # else the next step is the reset step again

    def _lr_multiplier(self, t: int) -> float | Tensor:
        """The re-warmup factor for step ``t``: a float, or a device scalar while skips are unread.

        ``t`` is an upper bound of the true step; :meth:`_settle` guarantees that when ``t`` is at
        or past ``warmup_until`` (or is a reset step) it is exact, so only inside a window can the
        two differ, and there the device subtracts the skips it counted.
        """
        w = self.warmup_steps
        if w <= 0:
            return 1.0
        if self._pending_reset == t:  # the first step of a re-warmup, if this step applies
            return rewarmup_multiplier(t, t + w, w)
        until = self.spam["warmup_until"]
        if not self._unsure or t >= until:
            return rewarmup_multiplier(t, until, w)
        assert self._skipped is not None
        return rewarmup_multiplier(t - self._skipped.double(), until, w)

    def _adam_step(self) -> None:
        """The AdamW update itself (torch's fused / foreach implementation)."""
        super().step()

    def _paper_adam_step(self, scale: float) -> None:
        """The SPAM authors' update: ``p ← (1 − lr·wd)·(p − lr·scale·√(1 − β₂ᵗ)/(1 − β₁ᵗ)·m/(√v + eps))``.

        State keys and formats are torch AdamW's (``step`` a CPU float tensor), so masks and
        checkpoints treat it as any AdamW state.
        """
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
            grads = [p.grad for p in params]
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            sizes = [-lr * scale * math.sqrt(1 - b2 ** float(n)) / (1 - b1 ** float(n)) for n in steps]
            for ps, gs, m, v, sz in _chunks(params, grads, ms, vs, sizes):  # bounds denom's memory
                torch._foreach_mul_(m, b1)
                torch._foreach_add_(m, gs, alpha=1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, gs, gs, value=1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, m, denom, sz)
            if wd > 0:
                torch._foreach_mul_(params, 1 - lr * wd)  # decay after the update, at the un-warmed LR

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

    def _clip_spikes(self, floor: float = CLIP_FLOOR) -> None:
        """g <- clamp(g, -sqrt(theta·(v + floor)), +sqrt(theta·(v + floor))), where v exists."""
        for group in self.param_groups:
            grads, vs = self._with_state(group, "exp_avg_sq")
            if self.compile_clip and grads:
                _clip_compiled()(grads, vs, self.theta, floor)
                continue
            for g, v in _chunks(grads, vs):
                thr = torch._foreach_add(v, floor)
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

    def reset_moments(self, keep: Tensor | None = None) -> None:
        """Zero exp_avg, exp_avg_sq and (AMSGrad) max_exp_avg_sq of every parameter; keep Adam's step.

        ``keep``: a device scalar; the moments are multiplied by it instead (1.0 keeps them).
        """
        for group in self.param_groups:
            tensors = [
                st[k]
                for p in group["params"]
                if (st := self.state.get(p))
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                if k in st
            ]
            if not tensors:
                continue
            if keep is None:
                torch._foreach_zero_(tensors)
            else:
                torch._foreach_mul_(tensors, keep)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._settle(self.spam["step"] + 1, force=True)  # exact counts in every checkpoint
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
        if self._skipped is not None:
            self._skipped.zero_()
        self._unsure, self._pending_reset = False, None
