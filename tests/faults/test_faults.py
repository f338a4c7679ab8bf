"""Fault injection: real signals to real training processes, planted NaNs, full disks, bad outputs dirs."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.errors import UserError
from gpt2.trainer import checkpoint
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import train_once
from tests.conftest import REPO, as_argv


def _run_flags(tiny_flags: dict, out: Path, **extra) -> dict:
    return dict(
        tiny_flags,
        dropout=0.1,
        max_iters=40,
        log_interval=5,
        eval_interval=10,
        save_checkpoint=True,
        checkpoint_interval=5,
        output_dir=str(out),
        **extra,
    )


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.load(out / checkpoint.LAST)
    assert state["step"] == 40
    return state["model"]


def _launch(flags: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "gpt2/train.py", *as_argv(flags)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_at_random_moments_then_resume_auto_loses_nothing(tiny_flags, tmp_path) -> None:
    """Kill -9 the trainer at random moments (startup, steps, eval, checkpoint writes), rerun the same
    command with --resume auto until it finishes: the final weights equal an uninterrupted run's."""
    reference = tmp_path / "reference"
    train_once(resolve(_run_flags(tiny_flags, reference)))
    expected = _final_weights(reference)

    out = tmp_path / "killed"
    flags = _run_flags(tiny_flags, out, resume="auto")
    rng = random.Random(1234)
    kills, deadline = 0, time.monotonic() + 120
    while kills < 3 and time.monotonic() < deadline:
        proc = _launch(flags)
        time.sleep(rng.uniform(1.0, 4.0))
        if proc.poll() is not None:  # finished before the kill
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = _launch(flags)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert kills >= 1
    got = _final_weights(out)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics.jsonl must hold one history, not replays"


def test_sigterm_from_outside_checkpoints_and_exits_cleanly(tiny_flags, tmp_path) -> None:
    """A real SIGTERM at an unplanned moment of a long run (the fault matrix plants them exactly)."""
    sig = signal.SIGTERM
    out = tmp_path / "out"
    flags = dict(_run_flags(tiny_flags, out), max_iters=100000, save_checkpoint=False)
    proc = _launch(flags)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stop_reason"] == f"signal {sig.name}"
    assert checkpoint.load(out / checkpoint.LAST)["step"] == results["iters"] > 0


class _PoisonedForward(torch.nn.Module):
    """Returns a NaN loss on the chosen forward calls (counted over training micro-steps)."""

    def __init__(self, model: torch.nn.Module, bad_calls: set[int]) -> None:
        super().__init__()
        self.model, self.bad_calls, self.calls = model, bad_calls, 0

    def forward(self, x, y):
        loss = self.model(x, y)
        self.calls += 1
        return loss * float("nan") if self.calls in self.bad_calls else loss


def _trainer_with_poison(flags: dict, bad_calls: set[int]) -> Trainer:
    trainer = Trainer(resolve(flags))
    trainer.step_fn.forward_model = _PoisonedForward(trainer.model, bad_calls)
    return trainer


def test_planted_nan_step_is_skipped_and_counted(tiny_flags) -> None:
    trainer = _trainer_with_poison(dict(tiny_flags, max_iters=10), bad_calls={4})
    results = trainer.fit()
    assert results["bad_steps"] == 1 and results["restarts"] == 0 and results["iters"] == 10
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    events = [json.loads(x) for x in Path(tiny_flags["output_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite_step_skipped"] == [4]


SPAM_SHORT = dict(optimizer="adamwspam", spam_interval=5, spam_warmup_steps=2)


@pytest.mark.parametrize("optimizer", [{}, SPAM_SHORT], ids=["adamw", "spam"])
def test_consecutive_nan_steps_reload_last_checkpoint_with_lower_lr(tiny_flags, optimizer) -> None:
    """Both skip on the device; SPAM's own count also goes back with the checkpoint."""
    flags = dict(tiny_flags, max_iters=12, save_checkpoint=True, checkpoint_interval=4, max_bad_steps=3)
    flags.update(optimizer)
    trainer = _trainer_with_poison(flags, bad_calls={6, 7, 8})
    results = trainer.fit()
    assert results["restarts"] == 1 and results["bad_steps"] == 3 and results["iters"] == 12
    assert results["lr_scale"] == 0.5
    events = [json.loads(x) for x in Path(flags["output_dir"], "metrics.jsonl").read_text().splitlines()]
    restart = [e for e in events if e.get("event") == "restart"]
    assert restart == [{"step": 4, "event": "restart", "from_step": 8, "lr_scale": 0.5}]
    if optimizer:  # 12 applied steps after the reload to step 4: 4 + 8, resets at 5 and 10
        assert trainer.optimizer.state_dict()["spam"]["step"] == 12
        assert trainer.optimizer.state_dict()["spam"]["resets"] == 2


def test_nan_without_checkpoint_fails_clearly(tiny_flags) -> None:
    trainer = _trainer_with_poison(dict(tiny_flags, max_iters=12, max_bad_steps=2), bad_calls={3, 4})
    with pytest.raises(UserError, match="2 consecutive non-finite steps at step 4 and no checkpoint"):
        trainer.fit()


def test_disk_full_during_periodic_checkpoint_keeps_previous_and_reports(
    tiny_flags, monkeypatch, capsys
) -> None:
    """ENOSPC on the second checkpoint: the first stays loadable, the error is reported, training finishes."""
    flags = dict(tiny_flags, max_iters=8, save_checkpoint=True, checkpoint_interval=4)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2 and obj.get("step") == 8:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(UserError, match="No space left on device"):
        train_once(resolve(flags))
    monkeypatch.undo()
    state = checkpoint.load(Path(flags["output_dir"]) / checkpoint.LAST)
    assert state["step"] == 4


def test_output_dir_of_another_run_is_refused(tiny_flags, capsys) -> None:
    from gpt2.cli import parse

    train_once(resolve(dict(tiny_flags, max_iters=2, save_checkpoint=True, checkpoint_interval=2)))
    with pytest.raises(SystemExit) as e:
        parse(as_argv(dict(tiny_flags, n_layer=3)))
    assert e.value.code == 2
    assert "holds another run's checkpoint" in capsys.readouterr().err
    assert parse(as_argv(dict(tiny_flags, overwrite=True)))  # explicit consent
    assert parse(as_argv(dict(tiny_flags, resume="auto")))


def test_deterministic_runs_are_bitwise_identical(tiny_flags, tmp_path) -> None:
    flags = dict(
        tiny_flags, dropout=0.1, max_iters=6, save_checkpoint=True, checkpoint_interval=6, deterministic=True
    )
    train_once(resolve(dict(flags, output_dir=str(tmp_path / "a"))))
    train_once(resolve(dict(flags, output_dir=str(tmp_path / "b"))))
    a = checkpoint.load(tmp_path / "a" / checkpoint.LAST)["model"]
    b = checkpoint.load(tmp_path / "b" / checkpoint.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torn_prepared_dataset_is_rebuilt_from_its_source(tiny_flags, tmp_path) -> None:
    """A local corpus whose val.bin no longer matches meta.json is prepared again, not trusted."""
    from gpt2.data.prepare import dataset_dir

    train_once(resolve(dict(tiny_flags, max_iters=1)))
    bin_path = dataset_dir(tiny_flags["dataset"], tiny_flags["data_dir"]) / "val.bin"
    size = bin_path.stat().st_size
    bin_path.write_bytes(bin_path.read_bytes()[:-1])
    train_once(resolve(dict(tiny_flags, max_iters=1, output_dir=str(tmp_path / "o2"))))
    assert bin_path.stat().st_size == size


def test_corrupt_data_file_without_source_names_the_file(tiny_flags, tmp_path) -> None:
    """A nanoGPT-style folder (bins, no meta.json) with a torn val.bin: a clear error naming it."""
    import numpy as np

    folder = tmp_path / "nanogpt_data"
    folder.mkdir()
    np.arange(5000, dtype=np.uint16).tofile(folder / "train.bin")
    (folder / "val.bin").write_bytes(np.arange(999, dtype=np.uint16).tobytes() + b"x")
    with pytest.raises(UserError, match=r"val\.bin"):
        train_once(resolve(dict(tiny_flags, dataset=str(folder), max_iters=1)))


def test_skipped_steps_are_counted_in_checkpoints_and_across_a_resume(tiny_flags, tmp_path) -> None:
    """A NaN step between log steps is in the next checkpoint, and a resumed run's results count it."""
    flags = dict(tiny_flags, max_iters=8, log_interval=4, save_checkpoint=True, checkpoint_interval=6)
    results = _trainer_with_poison(dict(flags, keep_checkpoints=2), bad_calls={5}).fit()
    assert results["bad_steps"] == 1
    mid = Path(flags["output_dir"]) / checkpoint.step_name(6)
    assert checkpoint.load(mid)["bad_steps"] == 1
    resumed = train_once(resolve(dict(flags, output_dir=str(tmp_path / "resumed"), resume=str(mid))))
    assert resumed["bad_steps"] == 1 and resumed["iters"] == 8
