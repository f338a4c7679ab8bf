"""AdamWPrune: AdamW (or AdamWSPAM) whose moment estimates feed the bitter importance scores.

The optimizer itself holds no masks: the run's :class:`~gpt2.optim.prune.pruner.Pruner` owns
them, reads this optimizer's moments through :meth:`AdamWPrune.moments` (its
:class:`~gpt2.optim.prune.pruner.MomentSource` interface) and zeroes the pruned entries of the
weights, gradients and moments. AdamW then leaves a zero weight with a zero gradient and zero
moments at exactly zero, so pruned entries stay pruned.

With ``interval = 0`` and clipping and spike detection off (the defaults) the base is plain
AdamW; with SPAM settings it is AdamWSPAM. Note that SPAM's moment resets zero the m and v
that the scores read; a mask update right after a reset sees one step's worth of state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from gpt2.optim.prune.pruner import Moments
from gpt2.optim.prune.scores import OPTIMIZER_SCORES
from gpt2.optim.spam import AdamWSPAM

VARIANTS = OPTIMIZER_SCORES


class AdamWPrune(AdamWSPAM):
    """AdamW(SPAM) for state-based pruning with the score ``variant`` (bitter0..bitter9).

    Other keyword arguments are :class:`~gpt2.optim.spam.AdamWSPAM`'s, with every SPAM feature
    off by default.
    """

    def __init__(self, params: Iterable[Any], variant: str = "bitter0", **spam: Any) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown AdamWPrune variant {variant!r}; known: {', '.join(VARIANTS)}")
        spam.setdefault("interval", 0)  # no moment resets and no re-warmup unless asked for
        spam.setdefault("warmup_steps", 0)
        super().__init__(params, **spam)
        self.variant = variant

    def moments(self, param: Tensor) -> Moments:
        """``param``'s Adam state (m, v, t; empty before its first step) and its group's beta1."""
        state: dict[str, Any] = dict(self.state.get(param, {}))
        for group in self.param_groups:
            if any(q is param for q in group["params"]):
                state["beta1"] = group["betas"][0]
                break
        return state  # type: ignore[return-value]
