"""What ``--pruning-method`` adds to the one training loop: masks on a schedule, and their report.

One mechanism for every method: a :class:`~gpt2.optim.prune.MaskSet` over the prunable weights,
a :class:`~gpt2.optim.prune.SparsitySchedule`, and an importance score from the registry
(:mod:`gpt2.optim.prune.scores`). For magnitude and movement the extension owns the masks; for
``state`` they belong to the :class:`~gpt2.optim.adamwprune.AdamWPrune` optimizer, which scores
with its own moments. Around each optimizer step: pruned gradient entries are zeroed before
clipping (so the clipped norm is that of the live weights), and, for optimizers that could move
a zero weight (none of the built-in ones), the masks are re-applied after it. After each step,
when the schedule says so, the masks grow to the scheduled sparsity and the pruned entries of
the weights and of the optimizer state are zeroed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gpt2.config import RunConfig, iteration_bump
from gpt2.errors import UserError
from gpt2.optim.adamwprune import AdamWPrune
from gpt2.optim.prune.masks import MaskSet, prunable_parameters, short_name, zero_fraction
from gpt2.optim.prune.schedule import SparsitySchedule
from gpt2.optim.prune.scores import importance
from gpt2.trainer.extension import Extension

# Optimizers whose step keeps a zero weight with a zero gradient and zero state at exactly zero.
KEEPS_ZEROS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moments, step counts; AdamWPrune's masks)."""
    total = sum(
        v.numel() * v.element_size()
        for st in optimizer.state.values()
        if isinstance(st, dict)
        for v in st.values()
        if isinstance(v, Tensor)
    )
    masks = getattr(optimizer, "masks", None)
    return total + (masks.nbytes if isinstance(masks, MaskSet) else 0)


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


class PruningExtension(Extension):
    """Prunes by ``method`` (magnitude, movement or state) on ``schedule``; see the module docstring."""

    name = "pruning"

    def __init__(
        self,
        method: str,
        schedule: SparsitySchedule,
        *,
        include_embeddings: bool = False,
        sample_fraction: float = 0.0,
        verbose: bool = False,
    ) -> None:
        if method not in ("magnitude", "movement", "state"):
            raise ValueError(f"unknown pruning method {method!r}")
        self.method = method
        self.schedule = schedule
        self.include_embeddings = include_embeddings
        self.sample_fraction = sample_fraction
        self.verbose = verbose
        self.applied = 0.0  # sparsity the masks were last updated to
        self.last_update = 0  # step of that update
        self.updates = 0
        self._masks: MaskSet | None = None  # bound at the first step (state: the optimizer's)
        self.initial: list[Tensor] | None = None  # movement: the weights at the start of training
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None  # state loaded before binding

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PruningExtension:
        p = cfg.pruning
        if p.pruning_ramp_end is None:
            raise UserError("pruning needs a ramp end: give --pruning-ramp-end with --num-epochs")
        schedule = SparsitySchedule(
            target=p.target_sparsity,
            warmup=p.pruning_warmup,
            ramp_end=p.pruning_ramp_end,
            frequency=p.pruning_frequency,
        )
        verbose = not cfg.train.quiet and not cfg.train.dry_run
        bump = iteration_bump(cfg)
        if bump and verbose:
            print(
                f"{cfg.optim.adamwprune_variant}: training {cfg.train.max_iters} steps ({1 + bump:.2f}x, the "
                "reference's recipe for this variant; give --max-iters to choose), sparsity ramp ends at "
                f"step {p.pruning_ramp_end}",
                flush=True,
            )
        return cls(
            p.pruning_method,
            schedule,
            include_embeddings=p.prune_embeddings,
            sample_fraction=p.pruning_threshold_sample,
            verbose=verbose,
        )

    @property
    def masks(self) -> MaskSet | None:
        """The masks in use; for ``state`` always the optimizer's (a checkpoint reload may replace them)."""
        if self.method == "state" and self.optimizer is not None:
            return self.optimizer.masks  # type: ignore[attr-defined]
        return self._masks

    @property
    def score_name(self) -> str:
        if self.method == "state":
            return getattr(self.optimizer, "variant", "state")
        return self.method

    # -------------------------------------------------------------- binding
    def _bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> MaskSet:
        """Create (or adopt) the masks on first use, then apply any state loaded from a checkpoint."""
        if self.masks is not None:
            return self.masks
        named = prunable_parameters(model, self.include_embeddings)
        if not named:
            raise UserError("--pruning-method: this model has no prunable nn.Linear weights")
        if self.method == "state":
            if not isinstance(optimizer, AdamWPrune):
                raise UserError(
                    "--pruning-method state needs --optimizer adamwprune (it scores by its state)"
                )
            optimizer.set_prunable(named)  # no-op unless --prune-embeddings widened the default set
        else:
            self._masks = MaskSet(named)
        self.optimizer = optimizer
        pending, self._pending = self._pending or {}, None
        if self.method != "state" and "masks" in pending:
            self.masks.load_state_dict(pending["masks"])
        if self.method == "movement":
            saved = pending.get("initial")
            self.initial = (
                [t.to(p.device, p.dtype) for t, p in zip(saved, self.masks.params)]
                if saved is not None
                else [p.detach().clone() for p in self.masks.params]
            )
        if self.verbose:
            s = self.schedule
            print(
                f"pruning ({self.score_name}): {self.masks.numel:,} weights in {len(self.masks)} tensors to "
                f"{s.target:.1%} sparsity, cubic ramp from step {s.warmup} to {s.ramp_end}, "
                f"masks updated every {s.frequency} steps",
                flush=True,
            )
        return self.masks

    # ------------------------------------------------------ around the step
    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        masks = self._bind(model, optimizer)
        if self.method == "state":
            optimizer.mask_gradients()  # type: ignore[attr-defined]
        else:
            masks.apply_to_grads()

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Adam(W), AdamWSPAM, AdamWPrune and SGD leave a weight at exactly zero when it, its gradient
        # and its state are zero, which the masks guarantee; other optimizers get the masks re-applied.
        if self.masks is not None and not isinstance(optimizer, KEEPS_ZEROS):
            self.masks.apply_to_weights()

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        masks = self._bind(model, optimizer)
        if not self.schedule.due(step, self.applied):
            return
        sparsity = self.schedule.sparsity_at(step)
        if self.method == "state":
            optimizer.prune(sparsity, sample_fraction=self.sample_fraction, seed=step)  # type: ignore[attr-defined]
        else:
            masks.update(self._score, sparsity, sample_fraction=self.sample_fraction, seed=step)
            masks.apply_to_weights()
            masks.apply_to_state(optimizer)
        self.applied, self.last_update = sparsity, step
        self.updates += 1

    def _score(self, i: int) -> Tensor:
        assert self.masks is not None
        state = {"initial": self.initial[i]} if self.initial is not None else {}
        return importance(self.method, self.masks.params[i], state)

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
        own = 0
        if self.masks is not None and self.method != "state":
            own += self.masks.nbytes
        if self.initial is not None:
            own += sum(t.numel() * t.element_size() for t in self.initial)
        return {
            "weights": _weight_bytes(model),
            "optimizer_state": optimizer_state_bytes(self.optimizer) if self.optimizer is not None else 0,
            "pruning_state": own,
        }

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        overall, per = self._sparsity(model)
        out = {"sparsity": overall, "sparsity_scheduled": self.applied}
        out.update({f"sparsity/{k}": v for k, v in per.items()})
        if self.optimizer is not None:
            n_params = sum(p.numel() for p in model.parameters())
            out["optimizer_state_bytes_per_param"] = optimizer_state_bytes(self.optimizer) / n_params
        return out

    def final_results(self, model: nn.Module) -> dict[str, Any]:
        overall, per = self._sparsity(model)
        mem = self._memory(model)
        n_params = sum(p.numel() for p in model.parameters())
        return {
            "final_sparsity": overall,
            "sparsity_per_layer": per,
            "target_sparsity": self.schedule.target,
            "pruning_method": self.method,
            "pruning_score": self.score_name,
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
        if self.masks is None:  # not bound yet: keep what was loaded
            return dict(self._pending or {"applied": self.applied, "last_update": self.last_update})
        state: dict[str, Any] = {
            "applied": self.applied,
            "last_update": self.last_update,
            "updates": self.updates,
        }
        if self.method != "state":  # AdamWPrune's masks are in the optimizer's state
            state["masks"] = self.masks.state_dict()
        if self.initial is not None:
            state["initial"] = list(self.initial)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.applied = float(state.get("applied", 0.0))
        self.last_update = int(state.get("last_update", 0))
        self.updates = int(state.get("updates", 0))
        if self.masks is None:
            self._pending = dict(state)
            return
        if self.method != "state" and "masks" in state:
            self.masks.load_state_dict(state["masks"])
        if self.method == "movement" and "initial" in state:
            self.initial = [t.to(p.device, p.dtype) for t, p in zip(state["initial"], self.masks.params)]
