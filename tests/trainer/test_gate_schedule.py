"""Gate activation schedules (V11-V18): frozen gates stay exactly 0 and untouched by the optimizer,
they open at the step the rule says, and a run resumed while frozen or mid-ramp is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.model.gates import scheduled_modules
from gpt2.trainer import checkpoint
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import extensions_for, train_once


def _flags(tiny_flags: dict, step: str, **extra) -> dict:
    return dict(tiny_flags, architecture="unified-ra", ra_step=step, **extra)


def _fit(flags: dict) -> Trainer:
    cfg = resolve(flags)
    trainer = Trainer(cfg, extensions_for(cfg))
    trainer.fit()
    return trainer


def _events(out: str) -> list[dict]:
    records = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "gates_opened"]


@pytest.mark.parametrize("step", ["V11", "V12", "V16"])
def test_frozen_gates_stay_exactly_zero_and_untouched_by_the_optimizer(tiny_flags, step) -> None:
    trainer = _fit(_flags(tiny_flags, step, max_iters=6, gate_delay_steps=1000, gate_variance_start=1000))
    modules = scheduled_modules(trainer.model)
    assert modules, "the step has scheduled reciprocal gates"
    for m in modules:
        assert torch.count_nonzero(m.w_rec) == 0 and float(m.rec_coupling) == 0.0
        state = trainer.optimizer.state[m.w_rec]
        assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
        assert m.w_rec.grad is None or torch.count_nonzero(m.w_rec.grad) == 0
    assert any(float((m.w_std.detach() - 0.9).abs().max()) > 0 for m in modules), "the other gates train"
    assert _events(tiny_flags["output_dir"]) == []


def test_delayed_gates_open_after_the_delay_and_then_train(tiny_flags) -> None:
    trainer = _fit(_flags(tiny_flags, "V12", max_iters=6, gate_delay_steps=3))
    assert [e["step"] for e in _events(tiny_flags["output_dir"])] == [3]
    for m in scheduled_modules(trainer.model):
        assert float(m.rec_coupling) == 1.0
        assert torch.count_nonzero(m.w_rec - 0.1) > 0, "opened at 0.1, then trained"
    results = json.loads(Path(tiny_flags["output_dir"], "results.json").read_text())
    assert results["gates_opened_at"] == 3 and results["gate_schedule"] == "delayed"


def test_variance_guided_gates_open_at_the_first_check_below_the_threshold(tiny_flags) -> None:
    rule = dict(gate_variance_start=4, gate_variance_every=2, gate_variance_window=3, gate_ramp_steps=4)
    trainer = _fit(_flags(tiny_flags, "V16", max_iters=8, gate_variance_threshold=1e9, **rule))
    (event,) = _events(tiny_flags["output_dir"])
    assert event["step"] == 4 and event["loss_variance"] > 0
    # the ramp: after step t the coupling is (t + 1 - 4) / 4, so 1 from step 7 on
    assert all(float(m.rec_coupling) == 1.0 for m in scheduled_modules(trainer.model))


def test_variance_guided_gates_stay_closed_while_the_loss_varies(tiny_flags) -> None:
    rule = dict(gate_variance_start=4, gate_variance_every=2, gate_variance_window=3)
    trainer = _fit(_flags(tiny_flags, "V16", max_iters=8, gate_variance_threshold=1e-12, **rule))
    assert _events(tiny_flags["output_dir"]) == []
    assert all(torch.count_nonzero(m.w_rec) == 0 for m in scheduled_modules(trainer.model))


def test_the_coupling_ramps_linearly(tiny_flags) -> None:
    rule = dict(gate_variance_start=2, gate_variance_every=2, gate_variance_window=2, gate_ramp_steps=8)
    trainer = _fit(_flags(tiny_flags, "V16", max_iters=5, gate_variance_threshold=1e9, **rule))
    assert all(float(m.rec_coupling) == pytest.approx(4 / 8) for m in scheduled_modules(trainer.model))


@pytest.mark.parametrize(
    "step,rule,resume_at",
    [
        ("V12", dict(gate_delay_steps=6), 3),  # frozen at the checkpoint
        ("V16", dict(gate_variance_start=4, gate_variance_every=2, gate_variance_window=3), 3),  # frozen
        ("V16", dict(gate_variance_start=4, gate_variance_every=2, gate_variance_window=3), 6),  # mid-ramp
    ],
    ids=["delayed-frozen", "variance-frozen", "variance-mid-ramp"],
)
def test_a_run_resumed_in_any_phase_of_the_schedule_is_exact(
    tiny_flags, tmp_path, step, rule, resume_at
) -> None:
    flags = _flags(
        tiny_flags,
        step,
        max_iters=10,
        dropout=0.1,
        save_checkpoint=True,
        checkpoint_interval=3,
        keep_checkpoints=5,
        gate_variance_threshold=1e9,
        gate_ramp_steps=4,
        **rule,
    )
    full = dict(flags, output_dir=str(tmp_path / "full"))
    train_once(resolve(full))
    mid = tmp_path / "full" / checkpoint.step_name(resume_at)
    resumed = dict(flags, output_dir=str(tmp_path / "resumed"), resume=str(mid))
    train_once(resolve(resumed))
    a = checkpoint.load(tmp_path / "full" / checkpoint.LAST)
    b = checkpoint.load(tmp_path / "resumed" / checkpoint.LAST)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opened = [
        json.loads((tmp_path / d / "results.json").read_text())["gates_opened_at"]
        for d in ("full", "resumed")
    ]
    assert opened[0] == opened[1] == (6 if step == "V12" else 4)


def test_gate_schedule_flags_need_the_v_series(tiny_flags) -> None:
    from gpt2.errors import ConfigError

    with pytest.raises(ConfigError, match="--gate-delay-steps needs --architecture unified-ra"):
        resolve(dict(tiny_flags, gate_delay_steps=5), explicit={"gate_delay_steps"})


def test_a_schedule_can_be_added_to_any_step_with_reciprocal_gates(tiny_flags) -> None:
    cfg = resolve(_flags(tiny_flags, "V1", gate_schedule="delayed"))
    assert cfg.gpt_config().gate_schedule == "delayed"
    assert resolve(_flags(tiny_flags, "V0", gate_schedule="delayed")).gpt_config().gate_schedule == "none"
