"""AdamWPrune: AdamW (or AdamWSPAM) that prunes by its own moment estimates.

The optimizer keeps one boolean keep-mask per prunable weight (:class:`~gpt2.optim.prune.MaskSet`,
one byte per weight; no float masks or copies of the weights) and keeps the pruned entries of
the weights, their gradients, ``exp_avg``, ``exp_avg_sq`` (and AMSGrad's maximum) exactly zero:
:meth:`prune` zeroes them, and every :meth:`step` zeroes the pruned gradient entries before the
update, after which AdamW leaves a zero weight with zero moments at exactly zero. Importance
scores are the bitter variants of :mod:`gpt2.optim.prune.scores`, read from this optimizer's
own state. When to prune and how much is the caller's (the pruning extension's schedule), so
the optimizer works with any model and any schedule.

With ``interval = 0`` and clipping and spike detection off (the defaults) the base is plain
AdamW; with SPAM settings it is AdamWSPAM. Note that SPAM's moment resets zero the m and v
that the scores read; a mask update right after a reset sees one step's worth of state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from gpt2.optim.prune.masks import MaskSet
from gpt2.optim.prune.scores import SCORES, importance, layer_sparsity
from gpt2.optim.spam import AdamWSPAM

VARIANTS = tuple(name for name in SCORES if name.startswith("bitter"))


class AdamWPrune(AdamWSPAM):
    """AdamW(SPAM) with state-based pruning of ``prunable`` (``(name, weight)`` pairs).

    ``variant`` names the importance score (bitter0..bitter9). Other keyword arguments are
    :class:`~gpt2.optim.spam.AdamWSPAM`'s, with every SPAM feature off by default.
    """

    def __init__(
        self,
        params: Iterable[Any],
        prunable: Sequence[tuple[str, Tensor]] = (),
        variant: str = "bitter0",
        **spam: Any,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown AdamWPrune variant {variant!r}; known: {', '.join(VARIANTS)}")
        spam.setdefault("interval", 0)  # no moment resets and no re-warmup unless asked for
        spam.setdefault("warmup_steps", 0)
        super().__init__(params, **spam)
        self.variant = variant
        self.masks = MaskSet([])
        self._grads_masked = False
        self.set_prunable(prunable)

    def _params(self) -> list[Tensor]:
        """Every parameter in state_dict order (the index a checkpoint refers to it by)."""
        return [p for g in self.param_groups for p in g["params"]]

    def set_prunable(self, named: Sequence[tuple[str, Tensor]]) -> None:
        """Choose which weights may be pruned; allowed until the first prune."""
        named = list(named)
        if self.masks.same_params(named):
            return
        if self.masks.active:
            raise ValueError("cannot change the prunable weights after pruning started")
        known = {id(p) for p in self._params()}
        missing = [n for n, p in named if id(p) not in known]
        if missing:
            raise ValueError(f"prunable weights not optimized by this optimizer: {missing[:3]}")
        self.masks = MaskSet(named)

    # ------------------------------------------------------------------ step
    def mask_gradients(self) -> None:
        """Zero the pruned gradient entries now (before gradient clipping); the next step skips it."""
        self.masks.apply_to_grads()
        self._grads_masked = True

    def _prepare_grads(self) -> None:
        if not self._grads_masked:
            self.masks.apply_to_grads()
        self._grads_masked = False

    # --------------------------------------------------------------- pruning
    def _score_state(self, p: Tensor) -> dict[str, Any]:
        state = dict(self.state.get(p, {}))
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                state["beta1"] = g["betas"][0]
                break
        return state

    def scores(self, i: int) -> Tensor:
        """Importance of every entry of prunable weight ``i`` under this optimizer's variant."""
        p = self.masks.params[i]
        return importance(self.variant, p, self._score_state(p))

    @torch.no_grad()
    def prune(self, sparsity: float, *, sample_fraction: float = 0.0, seed: int = 0) -> None:
        """Prune the lowest-scoring weights up to ``sparsity`` of all prunable weights; zero their state."""
        layerwise: Callable[[float, int, int], float] | None = (
            layer_sparsity if SCORES[self.variant].layerwise else None
        )
        self.masks.update(
            self.scores, sparsity, layer_sparsity=layerwise, sample_fraction=sample_fraction, seed=seed
        )
        self.masks.apply_to_weights()
        self.masks.apply_to_state(self)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._params())}
        sd["prune"] = {
            "variant": self.variant,
            "params": [index[id(p)] for p in self.masks.params],
            **self.masks.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        prune = state_dict.pop("prune", None)
        super().load_state_dict(state_dict)
        if prune is None:
            return
        params = self._params()
        named = [(n, params[i]) for n, i in zip(prune["names"], prune["params"])]
        if not self.masks.same_params(named):
            self.masks = MaskSet(named)
        self.masks.load_state_dict(prune)
