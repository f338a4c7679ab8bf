"""The README's commands, in short form, and every command line of the seed usage guide."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, as_argv

# The command lines of ../shared/spec/seed-usage.md (the users' existing commands), verbatim
# after `python gpt2/train.py` (torchrun's launcher flags dropped: multi-process runs are tested
# with the distributed code).
SEED_COMMANDS = [
    "--architecture vanilla --dataset finewebedu --batch-size 8 --gradient-accumulation 8 --max-iters 10000 "
    "--optimizer adamwspam",
    "--architecture unified-ra --ra-step V1 --dataset finewebedu --batch-size 8 --max-time 7200",
    "--architecture unified-ra --ablation-mode --ablation-steps V0,V1,V3,V7,V9 --dataset finewebedu "
    "--max-time 7200",
    "--architecture unified-ra --ra-step V1 --max-time 600 --dataset finewebedu",
    "--architecture unified-ra --ablation-mode --ablation-steps V0,V1,V3,V7,V9 --max-time 7200 "
    "--dataset finewebedu --tracker wandb --save-checkpoint",
    "--architecture vanilla --pruning-method state --target-sparsity 0.5 --optimizer adamwprune "
    "--adamwprune-variant bitter7 --max-iters 13000",
    "--architecture unified-ra --ra-step V1 --batch-size 8 --gradient-accumulation 2",
    "--optimizer adamwspam --learning-rate 6e-4 --warmup-steps 200 --tracker wandb --tracker-project "
    "my-gpt2-experiments --tracker-run-name v1-baseline --save-checkpoint --checkpoint-interval 1000 "
    "--output-dir ./checkpoints",
]


@pytest.mark.parametrize("command", SEED_COMMANDS, ids=range(len(SEED_COMMANDS)))
def test_seed_command_passes_dry_run(command, tmp_path) -> None:
    argv = [*shlex.split(command), "--dry-run"]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    out = subprocess.run(
        [sys.executable, "gpt2/train.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={"WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dry run ok" in out.stdout


def test_quickstart_short(corpus_dir, data_dir, tmp_path) -> None:
    """Train, evaluate, checkpoint, sample; loss falls; then the sample command reads the checkpoint."""
    out_dir = tmp_path / "run"
    flags = dict(
        model_name="tiny",
        n_layer=2,
        block_size=32,
        batch_size=8,
        max_iters=60,
        eval_interval=30,
        eval_samples=4,
        dataset=str(corpus_dir),
        data_dir=str(data_dir),
        output_dir=str(out_dir),
        save_checkpoint=True,
        checkpoint_interval=30,
        sample_tokens=20,
        learning_rate=3e-3,
    )
    proc = subprocess.run(
        [sys.executable, "gpt2/train.py", *as_argv(flags)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "---- sample ----" in proc.stdout and "Training complete!" in proc.stdout
    evals = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0  # from ~ln(50304)=10.8 to well below 8
    assert (out_dir / "checkpoint_last.pt").exists() and (out_dir / "checkpoint_best.pt").exists()
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2.sample",
            "--checkpoint",
            str(out_dir / "checkpoint_last.pt"),
            "--max-new-tokens",
            "10",
            "--prompt",
            "The king",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("The king") and len(sample.stdout) > len("The king")
