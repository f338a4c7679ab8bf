"""What ``--pruning-method`` adds to the one training loop: masks on a schedule, and their report.

One mechanism for every method: a :class:`~gpt2.optim.prune.pruner.Pruner` (the one owner of
the masks) with the run's registered score, driven by a
:class:`~gpt2.optim.prune.schedule.SparsitySchedule`. Around each optimizer step: pruned
gradient entries are zeroed before clipping (so the clipped norm is that of the live weights),
and, for optimizers that could move a zero weight (none of the built-in ones), the masks are
re-applied after it. After each step, when the schedule says so, the masks grow to the
scheduled sparsity and the pruned entries of the weights and of the optimizer state are zeroed.

The schedule counts iterations from 0, as the reference's pruners and the LR schedule do: after
the loop's step ``s`` (its 1-based count) it is at iteration ``s − 1``, so with
``--pruning-frequency 50`` the masks change after steps 51, 101, ... (the reference's iterations
50, 100, ...). Reports (``last_mask_update_step``) give the loop's step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gpt2.config import RunConfig, iteration_bump
from gpt2.errors import UserError
from gpt2.optim.prune.masks import MaskSet, prunable_parameters, short_name, zero_fraction
from gpt2.optim.prune.pruner import Pruner
from gpt2.optim.prune.schedule import SparsitySchedule
from gpt2.optim.prune.scores import SCORES
from gpt2.trainer.extension import Extension

# Optimizers whose step keeps a zero weight with a zero gradient and zero state at exactly zero.
KEEPS_ZEROS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moments, step counts)."""
    return sum(
        v.numel() * v.element_size()
        for st in optimizer.state.values()
        if isinstance(st, dict)
        for v in st.values()
        if isinstance(v, Tensor)
    )


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


class PruningExtension(Extension):
    """Prunes by the registered score ``score`` on ``schedule``; see the module docstring."""

    name = "pruning"

    def __init__(
        self,
        score: str,
        schedule: SparsitySchedule,
        *,
        include_embeddings: bool = False,
        sample_fraction: float = 0.0,
        verbose: bool = False,
        horizon: int | None = None,
    ) -> None:
        self.score = score
        self.horizon = horizon  # steps that a full --max-time budget stands for (None: steps only)
        self.time_fraction = 0.0
        self.schedule = schedule
        self.include_embeddings = include_embeddings
        self.sample_fraction = sample_fraction
        self.verbose = verbose
        self.applied = 0.0  # sparsity the masks were last updated to
        self.last_update = 0  # step of that update
        self.updates = 0
        self.pruner: Pruner | None = None  # built at the first step, over the optimizer being used
        self._pending: dict[str, Any] = {}  # pruner state loaded before it was built

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PruningExtension:
        p = cfg.pruning
        if p.pruning_ramp_end is None or cfg.pruning_score is None:
            raise UserError("pruning needs a ramp end: give --pruning-ramp-end with --num-epochs")
        schedule = SparsitySchedule(
            target=p.target_sparsity,
            warmup=p.pruning_warmup,
            ramp_end=p.pruning_ramp_end,
            frequency=p.pruning_frequency,
            # resolve() replaces auto by the score's reference ramp; a config built by hand may not
            shape=SCORES[cfg.pruning_score].ramp if p.pruning_schedule == "auto" else p.pruning_schedule,
        )
        verbose = not cfg.train.quiet and not cfg.train.dry_run
        bump = iteration_bump(cfg)
        if bump and verbose:
            print(
                f"{cfg.pruning_score}: training {cfg.train.max_iters} steps ({1 + bump:.2f}x, the "
                "reference's recipe for this variant; give --max-iters to choose), sparsity ramp ends at "
                f"step {p.pruning_ramp_end}",
                flush=True,
            )
        return cls(
            cfg.pruning_score,
            schedule,
            include_embeddings=p.prune_embeddings,
            sample_fraction=p.pruning_threshold_sample,
            verbose=verbose,
            # (--num-epochs fixes the step count only once the data is read: the ramp then counts steps)
            horizon=cfg.train.max_iters if cfg.train.max_time > 0 and cfg.train.num_epochs is None else None,
        )

    @property
    def masks(self) -> MaskSet | None:
        return self.pruner.masks if self.pruner is not None else None

    def _bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Pruner:
        """Build the pruner on first use, then apply any state loaded from a checkpoint."""
        if self.pruner is not None:
            return self.pruner
        named = prunable_parameters(model, self.include_embeddings)
        if not named:
            raise UserError("--pruning-method: this model has no prunable nn.Linear weights")
        self.pruner = Pruner(named, self.score, optimizer=optimizer, sample_fraction=self.sample_fraction)
        self.pruner.load_state_dict(self._pending)
        self._pending = {}
        if self.verbose:
            s, m = self.schedule, self.pruner.masks
            print(
                f"pruning ({self.score}): {m.numel:,} weights in {len(m)} tensors to "
                f"{s.target:.1%} sparsity, {s.shape} ramp from iteration {s.warmup} to {s.ramp_end} "
                f"(0-based), masks updated every {s.frequency} iterations",
                flush=True,
            )
        return self.pruner

    # ------------------------------------------------------ around the step
    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._bind(model, optimizer).masks.apply_to_grads()

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Adam(W), AdamWSPAM, AdamWPrune and SGD leave a weight at exactly zero when it, its gradient
        # and its state are zero, which the masks guarantee; other optimizers get the masks re-applied.
        if self.masks is not None and not isinstance(optimizer, KEEPS_ZEROS):
            self.masks.apply_to_weights()

    def on_time_budget(self, fraction: float) -> None:
        self.time_fraction = fraction

    def on_time_budget_spent(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.on_time_budget(1.0)  # the whole budget: the ramp's end, whatever the last step saw
        self.on_step_end(step, model, optimizer)

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pruner = self._bind(model, optimizer)
        it = step - 1  # the 0-based iteration that step ``step`` ran
        # under --max-time the ramp follows time as the LR does, so the run reaches its target
        position = max(it, self.time_fraction * self.horizon) if self.horizon else it
        if not self.schedule.due(it, self.applied, position):
            return
        sparsity = self.schedule.sparsity_at(position)
        pruner.prune(sparsity, seed=step)
        self.applied, self.last_update = sparsity, step
        self.updates += 1

    # ------------------------------------------------------------ reporting
    def _sparsity(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        if self.masks is not None:
            overall, per = self.masks.weight_sparsity()
        else:  # before the first step (the evaluation at step 0)
            named = prunable_parameters(model, self.include_embeddings)
            fractions = zero_fraction([p for _, p in named])
            n = sum(p.numel() for _, p in named)
            overall = sum(f * p.numel() for f, (_, p) in zip(fractions, named)) / max(1, n)
            per = {name: f for (name, _), f in zip(named, fractions)}
        return overall, {short_name(k): v for k, v in per.items()}

    def _memory(self, model: nn.Module) -> dict[str, int]:
        p = self.pruner
        return {
            "weights": _weight_bytes(model),
            "optimizer_state": optimizer_state_bytes(p.optimizer) if p and p.optimizer is not None else 0,
            "pruning_state": p.nbytes if p is not None else 0,
        }

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        overall, per = self._sparsity(model)
        out = {"sparsity": overall, "sparsity_scheduled": self.applied}
        out.update({f"sparsity/{k}": v for k, v in per.items()})
        if self.pruner is not None and self.pruner.optimizer is not None:
            n_params = sum(p.numel() for p in model.parameters())
            out["optimizer_state_bytes_per_param"] = optimizer_state_bytes(self.pruner.optimizer) / n_params
        return out

    def final_results(self, model: nn.Module) -> dict[str, Any]:
        overall, per = self._sparsity(model)
        mem = self._memory(model)
        n_params = sum(p.numel() for p in model.parameters())
        return {
            "final_sparsity": overall,
            "sparsity_per_layer": per,
            "target_sparsity": self.schedule.target,
            "pruning_schedule": self.schedule.shape,
            "pruning_score": self.score,
            "prunable_params": self.masks.numel if self.masks is not None else None,
            "mask_updates": self.updates,
            "last_mask_update_step": self.last_update,
            "optimizer_state_bytes_per_param": mem["optimizer_state"] / n_params,
            # (weights + optimizer state + masks/reference weights) in multiples of the weights
            "effective_memory_x_weights": sum(mem.values()) / mem["weights"],
            "memory_bytes": mem,
        }

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        own = self.pruner.state_dict() if self.pruner is not None else self._pending
        return {"applied": self.applied, "last_update": self.last_update, "updates": self.updates, **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.applied = float(state.get("applied", 0.0))
        self.last_update = int(state.get("last_update", 0))
        self.updates = int(state.get("updates", 0))
        own = {k: v for k, v in state.items() if k in ("masks", "initial")}
        if self.pruner is None:
            self._pending = own
        else:
            self.pruner.load_state_dict(own)
