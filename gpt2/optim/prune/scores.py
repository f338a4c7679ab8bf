"""Importance scores, registered by name: ``score(weight, state) -> tensor``; higher keeps, lower prunes.

This table is the only place the scores are defined: ``--pruning-method`` and
``--adamwprune-variant`` choices, their help, the extra training some variants get, the
layer-wise thresholds and each method's sparsity ramp (``--pruning-schedule auto``) are all read
from it. It imports no torch, so the command line can use it.

``state`` is a mapping of named tensors for that weight: Adam's ``exp_avg`` (m), ``exp_avg_sq``
(v), ``step`` (t) and ``beta1`` for the AdamWPrune variants, the weights at the start of
training (``initial``) for movement. When a score needs state that does not exist yet (before
the first optimizer step) it falls back to ``|w|``, as the reference does. ε = 1e-8.

bitter0..bitter9 are the reference's AdamWPrune variants (§6.3). bitter5 and bitter9 carry the
sign of their *stated* intent: Adam moves a weight toward zero when ``sign(w)·m > 0``, and the
score must be low (pruned first) for such weights, so the movement term is
``−sign(w)·m/(√v + ε)`` (see docs/changes-from-knlp.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

EPS = 1e-8
MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # state keys an optimizer's moments supply

ScoreFn = Callable[["Tensor", Mapping[str, Any]], "Tensor"]


@dataclass(frozen=True)
class Importance:
    """One registered score: its formula (for help and docs), function and needs."""

    formula: str
    fn: ScoreFn
    needs: tuple[str, ...] = ()  # state keys; any missing -> |w|
    layerwise: bool = False  # threshold each layer at its own sparsity (layer_sparsity)
    extra_iters: float = 0.0  # extra training (fraction of --max-iters) the reference's recipe gives it
    from_optimizer: bool = False  # an AdamWPrune variant: scored from the optimizer's moments
    ramp: str = "cubic"  # the reference's sparsity ramp for this score (schedule.RAMPS)

    @property
    def reads_moments(self) -> bool:
        return any(k in MOMENTS for k in self.needs)


def _adam_step_size(m: Tensor, v: Tensor) -> Tensor:
    """m / (√v + ε): Adam's (bias-uncorrected) step direction per weight."""
    return m / v.sqrt().add_(EPS)


def _bitter0(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    return w.square().mul_(_adam_step_size(s["exp_avg"], s["exp_avg_sq"]).abs_())


def _grad_magnitude(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    return w.abs().mul_(s["exp_avg"].abs().add_(EPS).sqrt_())


def _bitter5(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    toward_zero = _adam_step_size(s["exp_avg"], s["exp_avg_sq"]).mul_(w.sign())  # > 0: moving to 0
    return w.abs().mul_(0.1).sub_(toward_zero)


def _bitter6(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    m, v = s["exp_avg"], s["exp_avg_sq"]
    coherence = m.square().div_(v + EPS).sqrt_()
    return _grad_magnitude(w, s).mul_(coherence)


def _bitter7(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    return w.abs().mul_(s["exp_avg_sq"].abs().add_(EPS).pow_(0.25))


def _bitter8(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    import torch

    beta1 = s.get("beta1", 0.9)
    step = torch.as_tensor(s["step"], dtype=torch.float32, device=w.device)
    m_hat = s["exp_avg"] / (1.0 - torch.pow(beta1, step) + EPS)
    return w.abs().mul_(m_hat.abs_().add_(EPS).sqrt_())


def _bitter9(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    toward_zero = _adam_step_size(s["exp_avg"], s["exp_avg_sq"]).mul_(w.sign())
    return _grad_magnitude(w, s).sub_(toward_zero.mul_(0.1))


def _movement(w: Tensor, s: Mapping[str, Any]) -> Tensor:
    return w * (w - s["initial"])


_MV = ("exp_avg", "exp_avg_sq")


def _bitter(formula: str, fn: ScoreFn, needs: tuple[str, ...] = (), **kw: Any) -> Importance:
    return Importance(formula, fn, needs, from_optimizer=True, **kw)


SCORES: dict[str, Importance] = {
    "magnitude": Importance("|w|", lambda w, s: w.abs()),
    # the reference ramps movement pruning linearly (its §7.2), magnitude and AdamWPrune cubically
    "movement": Importance(
        "w·(w − w₀), w₀ the weights at the start of training", _movement, ("initial",), ramp="linear"
    ),
    "bitter0": _bitter("w²·|m|/(√v + ε)  (momentum × stability)", _bitter0, _MV),
    "bitter1": _bitter("|w|  (magnitude)", lambda w, s: w.abs()),
    "bitter2": _bitter("|w|  (magnitude)", lambda w, s: w.abs(), extra_iters=0.21),
    "bitter3": _bitter("|w|·√(|m| + ε)", _grad_magnitude, ("exp_avg",), extra_iters=0.30),
    "bitter4": _bitter(
        "bitter3, per-layer sparsity s·(0.7 … 1.3) capped at 0.95",
        _grad_magnitude,
        ("exp_avg",),
        layerwise=True,
        extra_iters=0.30,
    ),
    "bitter5": _bitter("−sign(w)·m/(√v + ε) + 0.1·|w|  (movement to zero)", _bitter5, _MV, extra_iters=0.30),
    "bitter6": _bitter("|w|·√(|m| + ε)·√(m²/(v + ε))  (coherence)", _bitter6, _MV, extra_iters=0.30),
    "bitter7": _bitter("|w|·(|v| + ε)^¼  (conservative variance)", _bitter7, ("exp_avg_sq",)),
    "bitter8": _bitter(
        "|w|·√(|m/(1 − β₁ᵗ + ε)| + ε)  (bias-corrected)", _bitter8, ("exp_avg", "step"), extra_iters=0.30
    ),
    "bitter9": _bitter("|w|·√(|m| + ε) − 0.1·sign(w)·m/(√v + ε)  (hybrid)", _bitter9, _MV, extra_iters=0.30),
}
OPTIMIZER_SCORES = tuple(name for name, s in SCORES.items() if s.from_optimizer)  # bitter0..bitter9


def describe(name: str) -> str:
    """``name: formula`` with the extra training, for help text and reports."""
    s = SCORES[name]
    extra = f" (+{s.extra_iters:.0%} steps)" if s.extra_iters else ""
    return f"{name} {s.formula}{extra}"


def importance(name: str, weight: Tensor, state: Mapping[str, Any]) -> Tensor:
    """Score of every element of ``weight`` (same shape, float32) under the registered ``name``."""
    entry = SCORES[name]
    w = weight.detach().float()
    if any(k not in state for k in entry.needs):
        return w.abs()
    return entry.fn(w, state)


def layer_sparsity(sparsity: float, layer: int, n_layers: int) -> float:
    """bitter4's sparsity of layer ``layer`` of ``n_layers``: ``min(0.95, s·(0.7 + 0.6·l/(L−1)))``.

    Early layers are pruned less (0.7·s), late ones more (1.3·s); the overall sparsity is their
    size-weighted mean, so it is close to, not exactly, ``sparsity``.
    """
    frac = layer / (n_layers - 1) if n_layers > 1 else 0.5
    return min(0.95, sparsity * (0.7 + 0.6 * frac))
