"""The one owner of a run's pruning masks: scores the weights, grows the masks, keeps pruned entries zero.

Every method is the same mechanism with another registered score (:mod:`.scores`): magnitude
reads the weights, movement the weights at the start of training (kept here), and the AdamWPrune
variants the optimizer's moments, through the narrow :class:`MomentSource` interface. The pruned
entries of the weights, their gradients and every per-weight optimizer state tensor are zeroed
through this object's :class:`~.masks.MaskSet`; nothing else holds masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypedDict, runtime_checkable

import torch
from torch import Tensor

from gpt2.optim.prune.masks import MaskSet
from gpt2.optim.prune.scores import SCORES, importance, layer_sparsity


class Moments(TypedDict, total=False):
    """What an optimizer-state score may read of one weight (Adam's names)."""

    exp_avg: Tensor  # m
    exp_avg_sq: Tensor  # v
    step: Tensor  # t
    beta1: float


@runtime_checkable
class MomentSource(Protocol):
    """An optimizer that lets scores read its moments (AdamWPrune)."""

    def moments(self, param: Tensor) -> Moments: ...


class Pruner:
    """Masks over ``named`` weights, pruned by the registered score ``score``.

    ``optimizer``: its per-weight state is zeroed with the weights, and for a score that reads
    moments it must be a :class:`MomentSource`. ``sample_fraction``: see :meth:`MaskSet.update`.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, Tensor]],
        score: str,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        sample_fraction: float = 0.0,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown importance score {score!r}; known: {', '.join(SCORES)}")
        self.score = score
        self.entry = SCORES[score]
        if self.entry.reads_moments and not isinstance(optimizer, MomentSource):
            raise ValueError(f"score {score} reads optimizer moments: {type(optimizer).__name__} has none")
        self.optimizer = optimizer
        self.sample_fraction = sample_fraction
        self.masks = MaskSet(named)
        # movement's reference point: the weights as they are when pruning is set up
        self.initial: list[Tensor] | None = (
            [p.detach().clone() for p in self.masks.params] if "initial" in self.entry.needs else None
        )

    def inputs(self, i: int) -> Mapping[str, Any]:
        """What the score of weight ``i`` reads besides the weight itself."""
        state: dict[str, Any] = {}
        if self.entry.reads_moments:
            state.update(self.optimizer.moments(self.masks.params[i]))  # type: ignore[union-attr]
        if self.initial is not None:
            state["initial"] = self.initial[i]
        return state

    def scores(self, i: int) -> Tensor:
        """Importance of every entry of weight ``i`` (same shape, float32)."""
        return importance(self.score, self.masks.params[i], self.inputs(i))

    @torch.no_grad()
    def prune(self, sparsity: float, *, seed: int = 0) -> None:
        """Grow the masks to ``sparsity`` of all masked weights; zero the pruned weights and their state."""
        layerwise: Callable[[float, int, int], float] | None = (
            layer_sparsity if self.entry.layerwise else None
        )
        self.masks.update(
            self.scores, sparsity, layer_sparsity=layerwise, sample_fraction=self.sample_fraction, seed=seed
        )
        self.masks.apply_to_weights()
        if self.optimizer is not None:
            self.masks.apply_to_state(self.optimizer)

    @property
    def nbytes(self) -> int:
        """Bytes this object keeps: the masks and movement's reference weights."""
        own = sum(t.numel() * t.element_size() for t in self.initial) if self.initial is not None else 0
        return self.masks.nbytes + own

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"masks": self.masks.state_dict()}
        if self.initial is not None:
            state["initial"] = list(self.initial)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "masks" in state:
            self.masks.load_state_dict(state["masks"])
        if self.initial is not None and "initial" in state:
            self.initial = [t.to(p.device, p.dtype) for t, p in zip(state["initial"], self.masks.params)]
