"""The command line: every bad input is one line and exit status 2, before any expensive work."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from gpt2.cli import build_parser, parse
from gpt2.config import resolve
from gpt2.errors import ConfigError
from tests.conftest import REPO

BAD = [
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "two"], "invalid int value"),
    (["--gradient-accumulation", "0"], "--gradient-accumulation must be positive"),
    (["--dataset", "no-such-dataset"], "unknown --dataset"),
    (["--dataset", ""], "--dataset must not be empty"),
    (["--target-sparsity", "1.0"], "--target-sparsity must be in [0, 1)"),
    (["--target-sparsity", "-0.1"], "--target-sparsity must be in [0, 1)"),
    (["--ra-step", "V1"], "--ra-step needs --architecture unified-ra"),
    (["--architecture", "transformer-xl"], "invalid choice"),
    (["--model-name", "gpt5"], "invalid choice"),
    (["--optimizer", "lion"], "invalid choice"),
    (["--adamwprune-variant", "bitter10"], "invalid choice"),
    (["--pruning-method", "random"], "invalid choice"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--learning-rate", "1e-3", "--min-lr", "1e-2"], "--min-lr must be in [0, learning rate]"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--dropout", "1.0"], "--dropout must be in [0, 1)"),
    (["--max-iters", "0"], "--max-iters must be positive"),
    (["--max-time", "-1"], "--max-time must be >= 0"),
    (["--n-head", "5"], "must be divisible by n_head"),
    (["--n-layer", "0"], "--n-layer must be positive"),
    (["--block-size", "-8"], "--block-size must be positive"),
    (["--eval-interval", "0"], "--eval-interval must be positive"),
    (["--eval-samples", "0"], "--eval-samples must be positive"),
    (["--log-interval", "0"], "--log-interval must be positive"),
    (["--checkpoint-interval", "0"], "--checkpoint-interval must be positive"),
    (["--device", "tpu"], "unknown --device"),
    (["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs CUDA"),
    (["--dtype", "int8"], "invalid choice"),
    (["--resume", "/no/such/checkpoint.pt"], "--resume: no checkpoint file"),
    (["--tracker", "tensorboardx"], "unknown --tracker"),
    (["--ablation-steps", "V0,V1"], "--ablation-steps needs --ablation-mode"),
    (["--num-epochs", "2", "--max-iters", "10"], "give --num-epochs or --max-iters, not both"),
    (["--num-epochs", "0"], "--num-epochs must be positive"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--compile-mode", "max-autotune"], "--compile-mode needs --compile"),
    (["--compile", "--compile-mode", "fastest"], "invalid choice"),
]


def test_settings_outside_the_command_line_are_checked_against_the_same_choices() -> None:
    """resolve() (the bench's --set, ablations, tests) refuses what argparse's choices would."""
    with pytest.raises(ConfigError, match="--compile-mode: 'fastest' is not one of"):
        resolve({"compile": True, "compile_mode": "fastest"})
    with pytest.raises(ConfigError, match="--optimizer: 'lion'"):
        resolve({"optimizer": "lion"})


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_presets_fill_unset_flags_and_flags_win() -> None:
    cfg = parse(["--model-name", "tiny"])
    assert (cfg.model.block_size, cfg.data.batch_size, cfg.gpt_config().n_embd) == (64, 16, 128)
    cfg = parse(["--model-name", "tiny", "--block-size", "128", "--n-embd", "256", "--no-bias"])
    g = cfg.gpt_config()
    assert (g.block_size, g.n_embd, g.n_layer, g.bias) == (128, 256, 4, False)
    cfg = parse([])
    assert (cfg.model.block_size, cfg.data.batch_size, cfg.data.gradient_accumulation) == (1024, 8, 8)
    assert cfg.optim.learning_rate == 6e-4 and cfg.optim.min_lr == 6e-5 and cfg.optim.decay_lr


def test_tiny_preset_trains_with_muon_and_each_optimizer_gets_its_lr() -> None:
    cfg = parse(["--model-name", "tiny"])
    assert (cfg.optim.optimizer, cfg.optim.learning_rate, cfg.optim.min_lr) == ("muon", 8e-3, 8e-4)
    cfg = parse(["--model-name", "tiny", "--optimizer", "adamw"])
    assert (cfg.optim.learning_rate, cfg.optim.min_lr) == (2e-3, 2e-4)  # not Muon's
    cfg = parse(["--model-name", "tiny", "--learning-rate", "1e-3"])
    assert (cfg.optim.optimizer, cfg.optim.learning_rate) == ("muon", 1e-3)  # a given LR wins
    assert parse(["--model-name", "gpt2"]).optim.optimizer == "adamw"

    from gpt2.launch.plan import arm_config, arms_of

    abl = parse(["--model-name", "tiny", "--ablate", "optimizer=adamw,muon"])
    arms, _ = arms_of(abl)
    lrs = [arm_config(abl, a, 1337, REPO / "unused").optim.learning_rate for a in arms]
    assert lrs == [2e-3, 8e-3]  # each arm resolved afresh: its optimizer's LR


def test_eval_budget_needs_max_time() -> None:
    with pytest.raises(SystemExit):
        parse(["--eval-budget", "0.1"])
    assert parse(["--eval-budget", "0.1", "--max-time", "60"]).train.eval_budget == 0.1


def test_every_field_has_a_flag_in_grouped_help() -> None:
    text = build_parser().format_help()
    for flag in (
        "--model-name",
        "--eval-samples",
        "--learning-rate",
        "--no-bias",
        "--no-decay-lr",
        "--weight-decay",
        "--dry-run",
        "--resume",
        "--seed",
        "--grad-clip",
        "--dtype",
        "--quiet",
        "--spam-theta",
        "--adamwprune-variant",
        "--pruning-warmup",
        "--tracker-run-name",
    ):
        assert flag in text, flag
    assert "Optimizer and learning rate:" in text and "Outputs and checkpoints:" in text


def test_help_is_fast_and_imports_no_torch() -> None:
    t = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv=['train.py','--help'];"
            "import runpy; runpy.run_path('gpt2/train.py', run_name='__main__')",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t
    assert out.returncode == 0 and "usage:" in out.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, gpt2.cli; gpt2.cli.build_parser(); print('torch' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"
    assert elapsed < 10  # generous: the real figure (~0.1 s) is in the benchmark notes, not a timed test


def test_script_reports_bad_flag_as_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "gpt2/train.py", "--batch-size", "-3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["train.py: error: --batch-size must be positive, got -3"]
