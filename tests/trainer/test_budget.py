"""Equal budgets: --max-time counts training steps only; a time-budgeted pruning run reaches its target."""

from __future__ import annotations

import time

import pytest

import gpt2.trainer.loop as loop_module
from gpt2.config import resolve
from gpt2.track.metrics import read_metrics
from gpt2.trainer.run import train_once


def timed_run(flags: dict, slow_eval_s: float, monkeypatch) -> dict:
    real = loop_module.Trainer.evaluate

    def slow(self):  # an evaluation that costs slow_eval_s more
        time.sleep(slow_eval_s)
        return real(self)

    monkeypatch.setattr(loop_module.Trainer, "evaluate", slow)
    try:
        return train_once(resolve(flags))
    finally:
        monkeypatch.setattr(loop_module.Trainer, "evaluate", real)


def test_slow_evaluations_do_not_shorten_the_training_budget(tiny_flags, tmp_path, monkeypatch) -> None:
    budget = 4.0
    flags = tiny_flags | dict(
        max_iters=100_000, max_time=budget, eval_interval=5, log_interval=5, eval_budget=0.0
    )
    fast = timed_run(flags | dict(output_dir=str(tmp_path / "fast")), 0.0, monkeypatch)
    slow = timed_run(flags | dict(output_dir=str(tmp_path / "slow")), 0.5, monkeypatch)
    for r in (fast, slow):
        step_s = r["train_time_s"] / r["iters"]
        assert budget <= r["train_time_s"] <= budget + 5 * step_s + 0.5, r["train_time_s"]
        assert r["stop_reason"] == "max_time"
    evaluations = slow["iters"] // 5 + 2  # step 0, every 5 steps, the final one
    assert slow["eval_time_s"] >= 0.5 * (evaluations - 1)
    assert slow["wall_time_s"] >= slow["train_time_s"] + slow["eval_time_s"]
    # both trained for the budget: the same number of steps to within the steps' own noise
    assert slow["iters"] >= 0.6 * fast["iters"]


def test_eval_budget_caps_evaluation_time_and_keeps_the_final_one(tiny_flags, tmp_path, monkeypatch) -> None:
    """--eval-budget 0.25 of a 4 s budget, 0.4 s per evaluation: at most 1 s of evaluation, the
    step-0 one skipped, some every-2-steps ones run, the final one at the last step."""
    flags = tiny_flags | dict(
        max_iters=100_000, max_time=4.0, eval_interval=2, log_interval=2, eval_budget=0.25
    )
    r = timed_run(flags | dict(output_dir=str(tmp_path / "capped")), 0.4, monkeypatch)
    evals = [e for e in read_metrics(tmp_path / "capped" / "metrics.jsonl") if "val_loss" in e]
    capped = r["eval_time_s"] - r["compare_time_s"]  # the comparison evaluations are outside the cap
    assert capped <= 0.25 * 4.0 + 0.2, capped  # + one evaluation's own work
    assert len(evals) == 2, [e["step"] for e in evals]  # 0.4 s each: one at step 2, the final
    assert evals[0]["step"] == 2 and evals[-1]["step"] == r["iters"] > 4
    # no budget: every interval, step 0 included
    r0 = timed_run(flags | dict(output_dir=str(tmp_path / "all"), eval_budget=0.0), 0.0, monkeypatch)
    steps = [e["step"] for e in read_metrics(tmp_path / "all" / "metrics.jsonl") if "val_loss" in e]
    assert steps[0] == 0 and steps[:3] == [0, 2, 4] and steps[-1] == r0["iters"]


@pytest.mark.parametrize("method", ["magnitude", "state"])
def test_time_budgeted_pruning_reaches_its_target(tiny_flags, tmp_path, method) -> None:
    over = dict(optimizer="adamwprune", adamwprune_variant="bitter7") if method == "state" else {}
    flags = tiny_flags | dict(
        max_iters=100_000,  # far beyond what the budget allows: the ramp must follow time
        max_time=6.0,
        pruning_method=method,
        target_sparsity=0.5,
        pruning_warmup=2,
        pruning_frequency=2,
        eval_interval=1000,
        log_interval=5,
        output_dir=str(tmp_path / "out"),
        **over,
    )
    results = train_once(resolve(flags))
    assert results["iters"] < 80_000 and results["stop_reason"] == "max_time"
    assert abs(results["final_sparsity"] - 0.5) < 0.005


def test_a_first_step_longer_than_the_budget_is_reported(tiny_flags, capsys) -> None:
    results = train_once(resolve(tiny_flags | dict(max_iters=100, max_time=1e-4)))
    assert results["iters"] == 1 and results["stop_reason"] == "max_time"
    assert results["budget_overrun_s"] == pytest.approx(results["train_time_s"] - 1e-4)
    err = capsys.readouterr().err
    assert "the first step took" in err and "more than the whole --max-time budget of 0.0001 s" in err


def test_a_run_within_its_budget_reports_no_overrun_warning(tiny_flags, capsys) -> None:
    results = train_once(resolve(tiny_flags | dict(max_iters=100_000, max_time=1.0)))
    assert results["stop_reason"] == "max_time" and results["iters"] > 1
    assert 0 <= results["budget_overrun_s"] < results["train_time_s"] / results["iters"] + 0.05
    assert "first step took" not in capsys.readouterr().err


def test_comparison_evaluations_run_on_their_grid_whatever_the_evaluation_budget(
    tiny_flags, tmp_path
) -> None:
    """A time-budgeted run whose --eval-budget allows no regular evaluation still has the comparison
    curve: the same validation batches at steps 16, 23, 32, ... and at its last step, counted as
    evaluation time; --compare-batches 0 turns them off."""
    flags = tiny_flags | dict(max_iters=100_000, max_time=3.0, eval_interval=1000, eval_budget=0.01)
    r = train_once(resolve(flags | dict(output_dir=str(tmp_path / "a"), compare_batches=2)))
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    compares = [m for m in records if "compare_val_loss" in m]
    grid = [s for s in (16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512) if s < r["iters"]]
    assert [m["step"] for m in compares] == [*grid, r["iters"]] and len(grid) >= 1
    assert all(0 < m["compare_val_loss"] < 11 for m in compares)
    assert r["compare_time_s"] == pytest.approx(sum(m["compare_s"] for m in compares))
    assert r["eval_time_s"] >= r["compare_time_s"]
    assert [m["step"] for m in records if "val_loss" in m] == [r["iters"]]  # regular: the final one only
    off = train_once(resolve(flags | dict(output_dir=str(tmp_path / "b"), compare_batches=0, max_time=1.0)))
    assert not [m for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if "compare_val_loss" in m]
    assert off["iters"] > 0
