"""The extension point: what an architecture or optimizer adds to the one training loop.

The model itself follows from the run configuration alone; an extension acts around the
optimizer step, contribute metrics at evaluation, and keep state in checkpoints.
The loop calls every registered extension in order; the default methods do nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Extension:
    """Base class; override only what the extension needs."""

    name = "extension"

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After backward, before clipping and the step (e.g. mask gradients)."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Right after the optimizer step (e.g. re-apply pruning masks)."""

    def on_step_loss(self, step: int, loss: torch.Tensor) -> None:
        """Step ``step``'s mean loss, still on the device (reading it back costs a sync)."""

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After step ``step`` (1-based count of completed steps) finished."""

    def pop_events(self) -> list[dict[str, Any]]:
        """Records for metrics.jsonl and the trackers since the last call (each with its "step")."""
        return []

    def on_time_budget(self, fraction: float) -> None:
        """After each step of a ``--max-time`` run: the fraction of the training-time budget used."""

    def on_time_budget_spent(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The ``--max-time`` budget ran out after step ``step``; no step follows."""

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra metrics recorded with each evaluation (e.g. gate statistics)."""
        return {}

    def final_results(self, model: nn.Module) -> dict[str, Any]:
        """Extra keys for results.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Extensions(list):
    """A run's extensions, in order; one checkpoint part, ``extensions`` -> {name: state}."""

    def state_dict(self) -> dict[str, Any]:
        return {"extensions": {e.name: e.state_dict() for e in self}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("extensions", {})
        for e in self:
            e.load_state_dict(saved.get(e.name, {}))
