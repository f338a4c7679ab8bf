"""lm-eval-harness on an exported model, offline, with the bundled local task (evals/tiny_mc)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.config import resolve
from gpt2.export import export
from gpt2.trainer import checkpoint
from gpt2.trainer.run import train_once
from tests.conftest import REPO

pytest.importorskip("lm_eval")


def test_lm_eval_scores_an_exported_model_on_the_local_task(tiny_flags, tmp_path) -> None:
    flags = dict(tiny_flags, max_iters=4, save_checkpoint=True, checkpoint_interval=4)
    train_once(resolve(flags))
    export(Path(flags["output_dir"]) / checkpoint.LAST, tmp_path / "hf")
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'}",
        "--include_path", "evals/tiny_mc", "--tasks", "gpt2_tiny_mc", "--device", "cpu", "--batch_size", "4",
    ]  # fmt: skip
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds")
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"\|gpt2_tiny_mc\|\s*1\|none\s*\|\s*0\|acc\s*\|.\s*\|\s*([\d.]+)\|", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert 0.0 <= float(m.group(1)) <= 1.0
