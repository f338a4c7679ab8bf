"""A small step-budgeted ablation (2 arms x 2 seeds) and its sequential one-thread run, the reference
that every executor must reproduce bitwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt2.cli import parse
from gpt2.launch.coordinator import run_ablation
from gpt2.trainer import checkpoint
from tests.conftest import REPO, as_argv, tiny_run_flags

ARMS = ("adamw", "muon")
SEEDS = (1337, 1338)
# Columns that must not depend on the executor (timings and memory do).
SAME = ("final_val_loss", "best_val_loss", "iters", "tokens_seen", "val_loss_at_equal_tokens", "n_params")


def ablation_argv(corpus_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """40 steps per run, an evaluation every 20, a checkpoint every 4 (kept: --save-checkpoint)."""
    flags = tiny_run_flags(corpus_dir, data_dir, out)
    del flags["optimizer"]  # the ablated setting
    flags |= dict(max_iters=40, eval_interval=20, save_checkpoint=True, checkpoint_interval=4)
    return [*as_argv(flags), "--ablate", "optimizer=" + ",".join(ARMS), "--ablation-seeds", "2", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / checkpoint.LAST)["model"]


def run_dirs(out: Path) -> dict[tuple[str, int], Path]:
    return {(a, s): out / a / f"seed{s}" for a in ARMS for s in SEEDS}


def assert_same_runs(out: Path, reference: Path) -> None:
    """Every (arm, seed) of ``out`` ends with bitwise the reference's weights and the same table."""
    import json

    for key, d in run_dirs(out).items():
        got, want = weights(d), weights(run_dirs(reference)[key])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{key}: weights differ"
    rows = [json.loads((o / "ablation_summary.json").read_text()) for o in (out, reference)]
    table = [{(r["step"], r["seed"]): tuple(r.get(c) for c in SAME) for r in s["runs"]} for s in rows]
    assert table[0] == table[1]
    arms = [[(a["step"], a["final_val_loss"], a["delta_ci95"]) for a in s["by_step"]] for s in rows]
    assert arms[0] == arms[1]


@pytest.fixture(scope="session")
def sequential(tmp_path_factory, corpus_dir, data_dir) -> Path:
    """The ablation run one job at a time under OMP_NUM_THREADS=1: each run records threads = 1."""
    out = tmp_path_factory.mktemp("sequential") / "abl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        summary: dict[str, Any] = run_ablation(parse(ablation_argv(corpus_dir, data_dir, out)))
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    return out


@pytest.fixture
def coordinator():
    """Starts ``gpt2/train.py ARGV`` as a coordinator process (stdout and stderr piped apart); one a
    test leaves running is killed afterwards."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str]) -> subprocess.Popen:
        procs.append(
            subprocess.Popen(
                [sys.executable, "gpt2/train.py", *argv],
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
