"""Gate activation schedules (reference §4.3, V11-V18): when the frozen reciprocal gates open.

A model built with ``gate_schedule`` set starts with every reciprocal gate frozen: ``w_rec = 0``
and a ``rec_coupling`` buffer at 0 that multiplies it, so its gradient is exactly 0, the
optimizer leaves it where it is (Adam's moments stay 0) and weight decay never applies to gates.
This extension decides when they open and drives the coupling; the values change, never the
code path, so a compiled model is neither broken nor recompiled.

- ``delayed``: after step ``delay`` the gates open: ``w_rec = 0.1``, coupling 1.
- ``variance``: from step ``start``, every ``every`` steps, once ``window`` per-step losses are
  recorded and their variance (sample variance of the finite ones) is below ``threshold``, the
  gates open once (``w_rec = 0.1``) and the coupling ramps linearly to 1 over ``ramp`` steps.
  The losses stay on the device until a check (one host read per check, not per step); under
  torchrun the check uses the ranks' mean losses, so every rank opens at the same step.

The opening step goes to metrics.jsonl (``event: gates_opened``), the trackers, results.json
(``gates_opened_at``) and the gate plot. Its state is checkpointed with the run (the coupling is
in the model's state dict), so a run resumed while frozen or mid-ramp is the uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from gpt2.config import RunConfig
from gpt2.model.gates import W_REC_INIT, set_reciprocal_coupling
from gpt2.trainer.extension import Extension


class GateSchedule(Extension):
    name = "gate_schedule"

    def __init__(
        self,
        kind: str,
        *,
        delay: int = 75,
        start: int = 250,
        every: int = 50,
        window: int = 100,
        threshold: float = 0.02,
        ramp: int = 200,
    ) -> None:
        if kind not in ("delayed", "variance"):
            raise ValueError(f"unknown gate schedule {kind!r}")
        self.kind, self.delay, self.start, self.every = kind, delay, start, every
        self.window, self.threshold, self.ramp = window, threshold, ramp
        self.opened_at: int | None = None
        self.losses: list[torch.Tensor] = []  # the latest per-step losses (variance schedule, while frozen)
        self._events: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GateSchedule:
        m = cfg.model
        return cls(
            cfg.gpt_config().gate_schedule,
            delay=m.gate_delay_steps,
            start=m.gate_variance_start,
            every=m.gate_variance_every,
            window=m.gate_variance_window,
            threshold=m.gate_variance_threshold,
            ramp=m.gate_ramp_steps,
        )

    def on_step_loss(self, step: int, loss: torch.Tensor) -> None:
        if self.kind == "variance" and self.opened_at is None:
            self.losses.append(loss.detach())
            del self.losses[: -self.window]

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.opened_at is None:
            variance = self._variance_due(step)
            if self.kind == "delayed" and step >= self.delay:
                self._open(step, model, coupling=1.0, variance=None)
            elif variance is not None and variance < self.threshold:
                self._open(step, model, coupling=min(1.0, 1 / self.ramp), variance=variance)
            elif variance is not None:  # a check that kept them closed: its variance is worth a record
                self._events.append({"step": step, "event": "gates_checked", "loss_variance": variance})
        elif self.kind == "variance" and step - self.opened_at < self.ramp:
            set_reciprocal_coupling(model, min(1.0, (step + 1 - self.opened_at) / self.ramp))

    def _variance_due(self, step: int) -> float | None:
        """At a check step of the variance schedule, the variance of the recorded losses (else None)."""
        if self.kind != "variance" or step < self.start or (step - self.start) % self.every:
            return None
        if len(self.losses) < self.window:
            return None
        device = self.losses[-1].device  # (losses restored from a checkpoint are on the CPU)
        values = torch.stack([t.to(device, torch.float32) for t in self.losses])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # the same decision on every rank
            values /= torch.distributed.get_world_size()
        finite = [v for v in values.tolist() if math.isfinite(v)]
        return statistics.variance(finite) if len(finite) > 1 else None

    def _open(self, step: int, model: nn.Module, coupling: float, variance: float | None) -> None:
        set_reciprocal_coupling(model, coupling, open_at=W_REC_INIT)
        self.opened_at, self.losses = step, []
        event: dict[str, Any] = {"step": step, "event": "gates_opened", "gate_schedule": self.kind}
        if variance is not None:
            event["loss_variance"] = variance
        self._events.append(event)

    def pop_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def final_results(self, model: nn.Module) -> dict[str, Any]:
        return {"gate_schedule": self.kind, "gates_opened_at": self.opened_at}

    def state_dict(self) -> dict[str, Any]:
        """Under torchrun the losses saved are the ranks' means (the checkpoint keeps rank 0's state):
        what every check averages anyway, so a resumed run decides as the uninterrupted one."""
        losses = torch.stack([t.float().cpu() for t in self.losses]) if self.losses else torch.zeros(0)
        dist = torch.distributed
        if len(losses) and dist.is_available() and dist.is_initialized():  # (save() runs on every rank)
            on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            reduced = losses.to(on)
            dist.all_reduce(reduced)
            losses = (reduced / dist.get_world_size()).cpu()
        return {"opened_at": -1 if self.opened_at is None else self.opened_at, "losses": losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        opened = int(state["opened_at"])
        self.opened_at = None if opened < 0 else opened
        self.losses = list(state["losses"].unbind(0)) if len(state["losses"]) else []
