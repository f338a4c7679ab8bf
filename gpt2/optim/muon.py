"""Muon for the blocks' matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) orthogonalises
each 2-D weight's momentum with a Newton-Schulz iteration. It suits the hidden matrices only, so
the embeddings (and the head tied to them), LayerNorms, biases and gates stay with AdamW.

**One learning rate for both.** Muon runs with ``adjust_lr_fn="match_rms_adamw"``: a matrix of
shape (A, B) steps by ``lr * 0.2 * sqrt(max(A, B))``, which gives Muon's orthogonal update the
RMS (about 0.2) of an AdamW update. So ``--learning-rate`` means the same step size for both
halves, and AdamW's tuned LR and schedule carry over (Liu et al. §2.2); ``--weight-decay`` is
decoupled in both (``p *= 1 - lr * wd``).

**Newton-Schulz precision.** torch's Muon iterates in bf16, which is fast where bf16 matmuls are
(CUDA, CPUs with AMX tiles). Elsewhere bf16 matmuls are emulated and slower than fp32 (a 2-core
AVX2 EPYC: the step 1.7x slower than AdamW's), so :class:`Muon` iterates in fp32 there; with
bf16 it *is* ``torch.optim.Muon`` (tested bitwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def newton_schulz(
    g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> Tensor:
    """The quintic Newton-Schulz iteration of torch's Muon (same coefficients), in ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton-Schulz iteration runs in ``ns_dtype`` (bf16: torch's own)."""

    def __init__(
        self, params: Iterable[Any], *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any
    ) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from torch.optim._muon import _adjust_lr  # the LR mapping, exactly torch's

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - mom)
                update = g.lerp(buf, mom) if group["nesterov"] else buf
                update = newton_schulz(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Two optimizers behind one interface: ``param_groups`` are theirs (Muon's first, so the
    trainer's LR schedule reaches both), ``state`` is shared, and :meth:`state_dict` is the usual
    one-optimizer layout, so checkpoints and resume need nothing special."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # (replaces the group dicts and the state)
        self._link()
