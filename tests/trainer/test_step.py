"""One training step: no host reads with the fused optimizers, and non-finite steps skipped either way."""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

from gpt2.config import resolve
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import train_once
from tests.conftest import CUDA, DEVICES, HostReads


def _trainer(tiny_flags: dict, **overrides) -> Trainer:
    trainer = Trainer(resolve(dict(tiny_flags, **overrides)))
    trainer._setup_data()
    return trainer


def _snapshot(trainer: Trainer) -> list[torch.Tensor]:
    state = [s for v in trainer.optimizer.state.values() for s in v.values() if torch.is_tensor(s)]
    return [t.detach().clone() for t in [*trainer.model.parameters(), *state]]


# A magnitude-pruning schedule that updates the masks at every step from the first.
PRUNE_FAST = dict(target_sparsity=0.5, pruning_warmup=1, pruning_frequency=1, pruning_ramp_end=4)

# Optimizers whose step makes no host read: each skips a non-finite step on the device.
ON_DEVICE = {
    "adamw": {},
    "adamwspam": dict(optimizer="adamwspam", spam_enable_clip=True),
    "adamwprune": dict(
        optimizer="adamwprune",
        adamwprune_variant="bitter7",
        pruning_method="state",
        **PRUNE_FAST,
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ON_DEVICE))
def test_training_step_reads_nothing_back_from_the_device(tiny_flags, name, device) -> None:
    trainer = _trainer(tiny_flags, device=device, **ON_DEVICE[name])
    assert trainer.step_fn.device_skip
    for _ in range(2):  # the optimizer state first; SPAM confirms at step 2 that clipping may start
        trainer.step_fn(trainer.data.train_batch, 1e-3)
    for ext in trainer.extensions:  # pruning: masks at some sparsity, so masking does real work
        ext.on_step_end(3, trainer.model, trainer.optimizer)  # iteration 2, past the warm-up
    # On CUDA, also any synchronising call (a blocking copy, a stream or device sync) raises.
    sync_mode = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
    try:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        with HostReads() as reads:
            out = trainer.step_fn(trainer.data.train_batch, 1e-3)
            out = trainer.step_fn(trainer.data.train_batch, 1e-3)
    finally:
        if sync_mode is not None:
            torch.cuda.set_sync_debug_mode(sync_mode)
    assert reads.count == 0
    assert float(out.applied) == 1.0


def test_spike_detection_keeps_the_host_check(tiny_flags) -> None:
    """SPAM's z-score reads the gradient norm on the host, so the step checks it there too."""
    trainer = _trainer(tiny_flags, optimizer="adamwspam", spam_spike_detection=True)
    assert not trainer.step_fn.device_skip


@pytest.mark.parametrize(
    "name,device_skip",
    [("adamw", True), ("adamwspam", True), ("adamwprune", True), ("adamwspam", False)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_step_leaves_weights_and_optimizer_state_untouched(
    tiny_flags, name, device_skip, device
) -> None:
    """On the device (the optimizer's found_inf) or by a host read: the same outcome."""
    trainer = _trainer(tiny_flags, device=device, **ON_DEVICE[name])
    trainer.step_fn.device_skip = device_skip
    trainer.step_fn(trainer.data.train_batch, 1e-3)
    before = _snapshot(trainer)
    steps_before = [int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s]
    spam_before = dict(getattr(trainer.optimizer, "spam", {}))

    forward = trainer.step_fn.forward_model
    trainer.step_fn.forward_model = lambda x, y: forward(x, y) * float("nan")
    out = trainer.step_fn(trainer.data.train_batch, 1e-3)
    trainer.step_fn.forward_model = forward

    assert float(out.applied) == 0.0
    after = _snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert [int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s] == steps_before
    if spam_before:  # SPAM's own count (read back here by state_dict) did not advance either
        assert trainer.optimizer.state_dict()["spam"]["step"] == spam_before["step"]
    assert all(p.grad is None for p in trainer.model.parameters())
    out = trainer.step_fn(trainer.data.train_batch, 1e-3)  # and training goes on
    assert float(out.applied) == 1.0
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(trainer), strict=True))


@pytest.mark.parametrize("mode", ["default", "max-autotune", "reduce-overhead"])
def test_compile_mode_reaches_torch_compile(tiny_flags, monkeypatch, mode) -> None:
    compiled, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = _trainer(tiny_flags, compile=True, compile_mode=mode, gradient_accumulation=2)
    assert compiled == [{"mode": None if mode == "default" else mode}]
    trainer.step_fn(trainer.data.train_batch, 1e-3)
    # CUDA graphs: every micro-step tells the graph trees that a new replay begins
    assert len(marks) == (2 if mode == "reduce-overhead" else 0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(architecture="unified-ra", ra_step="V6"),  # every RA / R-MLP mechanism
        dict(architecture="unified-ra", ra_step="V2", pruning_method="magnitude", **PRUNE_FAST),
        dict(optimizer="adamwspam", spam_interval=3, spam_warmup_steps=2),
    ],
    ids=["V6", "V2-magnitude", "adamwspam"],
)
def test_compiled_training_traces_once_for_training_and_once_for_evaluation(
    tiny_flags, monkeypatch, overrides
) -> None:
    """No recompilation as steps, LR, mask updates, SPAM resets and evaluation come and go."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    trainer = _trainer(tiny_flags, compile=True, **overrides)
    for step in range(1, 7):
        trainer.step_fn(trainer.data.train_batch, 1e-3 * step)
        for ext in trainer.extensions:
            ext.on_step_end(step, trainer.model, trainer.optimizer)
        if step % 3 == 0:
            trainer.evaluate()
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])
    assert not counters["recompiles"], dict(counters["recompiles"])


@pytest.mark.parametrize(
    "device,dtype,mode",
    [
        pytest.param(
            "cpu", "float32", "default",
            marks=pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler"),
        ),
        *[pytest.param("cuda", "bfloat16", m, marks=CUDA) for m in ("default", "reduce-overhead")],
    ],
)  # fmt: skip
def test_compiled_training_learns(tiny_flags, device, dtype, mode) -> None:
    """The real compiler (inductor; on CUDA also with CUDA graphs) trains: the loss falls from ln V."""
    flags = dict(tiny_flags, device=device, dtype=dtype, compile=True, compile_mode=mode)
    flags.update(max_iters=30, warmup_steps=5, learning_rate=3e-3, eval_interval=30)
    results = train_once(resolve(flags))
    assert results["bad_steps"] == 0
    assert results["final_val_loss"] < 8.5  # ln(50304) = 10.8 at the start


@pytest.mark.parametrize("name", list(ON_DEVICE))
def test_steps_keep_no_tensors_from_earlier_steps(tiny_flags, name) -> None:
    """A long run's step holds on to nothing from earlier steps (outputs, flags, SPAM counters)."""
    spam = dict(spam_interval=4, spam_warmup_steps=2) if name == "adamwspam" else {}
    trainer = _trainer(tiny_flags, **ON_DEVICE[name], **spam)

    def live_tensors() -> list[torch.Tensor]:
        gc.collect()
        return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]

    for _ in range(4):
        trainer.step_fn(trainer.data.train_batch, 1e-3)
    before = {id(t) for t in live_tensors()}
    for _ in range(12):  # three SPAM resets and re-warmups
        trainer.step_fn(trainer.data.train_batch, 1e-3)
    kept = [t for t in live_tensors() if id(t) not in before]  # made by these steps, still alive
    assert kept == []
