"""One training step: no host reads with fused AdamW, and non-finite steps skipped either way."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2.config import resolve
from gpt2.trainer.loop import Trainer


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``bool()``, ``float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _trainer(tiny_flags: dict, **overrides) -> Trainer:
    trainer = Trainer(resolve(dict(tiny_flags, **overrides)))
    trainer._setup_data()
    return trainer


def _snapshot(trainer: Trainer) -> list[torch.Tensor]:
    state = [s for v in trainer.optimizer.state.values() for s in v.values() if torch.is_tensor(s)]
    return [t.detach().clone() for t in [*trainer.model.parameters(), *state]]


def test_fused_adamw_step_reads_nothing_back_from_the_device(tiny_flags) -> None:
    trainer = _trainer(tiny_flags)
    assert trainer.step_fn.device_skip
    trainer.step_fn(trainer.data.train_batch, 1e-3)  # creates the optimizer state first
    with _HostReads() as reads:
        out = trainer.step_fn(trainer.data.train_batch, 1e-3)
    assert reads.count == 0
    assert float(out.applied) == 1.0


@pytest.mark.parametrize("optimizer", ["adamw", "adamwspam"])
def test_nonfinite_step_leaves_weights_and_optimizer_state_untouched(tiny_flags, optimizer) -> None:
    """On the device (fused AdamW's found_inf) or by a host read (SPAM): the same outcome."""
    trainer = _trainer(tiny_flags, optimizer=optimizer)
    assert trainer.step_fn.device_skip == (optimizer == "adamw")
    trainer.step_fn(trainer.data.train_batch, 1e-3)
    before = _snapshot(trainer)
    steps_before = [int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s]

    forward = trainer.step_fn.forward_model
    trainer.step_fn.forward_model = lambda x, y: forward(x, y) * float("nan")
    out = trainer.step_fn(trainer.data.train_batch, 1e-3)
    trainer.step_fn.forward_model = forward

    assert float(out.applied) == 0.0
    after = _snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert [int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s] == steps_before
    assert all(p.grad is None for p in trainer.model.parameters())
    out = trainer.step_fn(trainer.data.train_batch, 1e-3)  # and training goes on
    assert float(out.applied) == 1.0
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(trainer), strict=True))
