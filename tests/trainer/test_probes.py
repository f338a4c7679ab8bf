"""Probe runs: accuracy on a synthetic task's answer positions, from evaluation to results and summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2.analysis.summary import summarize, summary_markdown
from gpt2.config import resolve
from gpt2.data.prepare import more_data_hint
from gpt2.errors import ConfigError
from gpt2.track.console import Console
from gpt2.track.metrics import read_metrics
from gpt2.trainer.distributed import DistInfo
from gpt2.trainer.evaluate import evaluate
from gpt2.trainer.run import train_once


class _Oracle(nn.Module):
    """Logits that put the target first at every other answer, and token 0 first elsewhere."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.targets = targets

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, logits_at=None) -> torch.Tensor:
        logits = torch.zeros(*x.shape, 8)
        logits[..., 0] = 1.0
        rows, cols = torch.nonzero(self.targets != -1, as_tuple=True)
        right = torch.arange(len(rows)) % 2 == 0
        logits[rows[right], cols[right], self.targets[rows[right], cols[right]]] = 3.0
        return logits[logits_at]


class _Data:
    answers = True

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y

    def eval_batches(self, split: str, n: int):
        for _ in range(n):
            yield torch.zeros_like(self.y), self.y


def test_accuracy_counts_the_answer_positions_only() -> None:
    y = torch.full((2, 6), -1)
    y[:, 3:] = torch.tensor([[5, 6, 7], [1, 2, 3]])  # 6 answers, the oracle gets 3 right
    model = _Oracle(y)
    ev = evaluate(
        model, model, _Data(y), samples=2, device=torch.device("cpu"), dtype=torch.float32,
        dist=DistInfo(), console=Console(False), splits=("val",),
    )  # fmt: skip
    assert ev["val_accuracy"] == pytest.approx(0.5) and ev["val_accuracy_se"] == 0.0
    right = -math.log(math.exp(3) / (math.exp(3) + math.exp(1) + 6))  # the target at 3, token 0 at 1
    wrong = -math.log(1 / (math.exp(1) + 7))
    assert ev["val_loss"] == pytest.approx((right + wrong) / 2, rel=1e-5)


def _mqar_flags(out: Path, **kw) -> dict:
    return dict(
        model_name="tiny", n_layer=2, n_embd=64, n_head=1, block_size=16, dataset="mqar", task_vocab_size=64,
        mqar_kv_pairs=2, task_train_examples=5_000, task_val_examples=256, batch_size=32, optimizer="adamw",
        learning_rate=3e-3, warmup_steps=10, max_iters=150, eval_interval=75, eval_samples=4, log_interval=25,
        device="cpu", dtype="float32", quiet=True, sample_tokens=0, output_dir=str(out), threads=1,
    ) | kw  # fmt: skip


def test_logits_at_selected_positions_are_those_of_the_full_logits() -> None:
    from gpt2.model import GPT
    from tests.conftest import small_gpt_config

    model = GPT(small_gpt_config()).eval()
    x = torch.randint(0, 50, (2, 8))
    at = torch.zeros(2, 8, dtype=torch.bool)
    at[0, 3] = at[1, 0] = at[1, 7] = True
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_at=at), model(x)[at])


def test_a_model_learns_mqar_and_its_accuracy_reaches_results_and_metrics(tmp_path) -> None:
    results = train_once(resolve(_mqar_flags(tmp_path / "run")))
    assert results["final_val_loss"] < 0.6 * math.log(64)
    assert results["final_val_accuracy"] > 0.3  # chance: 1 in 32 values
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 75, 150] and evals[0]["val_accuracy"] < 0.1
    assert all("compare_val_accuracy" in r for r in records if "compare_val_loss" in r)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final_val_accuracy_se"] > 0


def test_a_run_that_repeats_its_data_says_so_and_how_to_avoid_it(tmp_path, capsys) -> None:
    train_once(resolve(_mqar_flags(tmp_path / "run", task_train_examples=100, max_iters=10)))
    err = capsys.readouterr().err
    assert "warning: the run will see its training data 3.2 times" in err
    assert "--task-train-examples 320" in err


def _run(folder: Path, loss: float, accuracy: float) -> dict:
    folder.mkdir(parents=True)
    results = dict(
        final_val_loss=loss, best_val_loss=loss, iters=10, tokens_seen=1000, wall_time_s=1.0,
        train_time_s=1.0, peak_memory_bytes=1, n_params=1, stop_reason="max_iters",
        final_val_accuracy=accuracy,
    )  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))
    records = [
        dict(
            step=s,
            tokens=100 * s,
            elapsed_s=0.1 * s,
            compare_val_loss=loss + 1 / s,
            compare_val_accuracy=accuracy,
        )
        for s in (5, 10)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dict(status="done", dir=str(folder))


def test_a_higher_accuracy_is_the_better_verdict(tmp_path) -> None:
    runs = []
    for seed, noise in zip((1, 2, 3), (0.0, 0.01, -0.01), strict=True):
        runs.append(dict(step="V0", seed=seed, **_run(tmp_path / f"a{seed}", 2.0, 0.5 + noise)))
        runs.append(dict(step="V1", seed=seed, **_run(tmp_path / f"b{seed}", 2.0, 0.9 + 2 * noise)))
    cfg = resolve(dict(model_name="tiny"))
    s = summarize(cfg, ["V0", "V1"], [1, 2, 3], runs, "V0", decide_on="accuracy")
    arm = s["by_step"][1]
    assert s["decide_on"] == "val_accuracy_at_equal_tokens" and s["higher_is_better"]
    assert arm["decide_value"] == pytest.approx(0.9) and arm["delta_vs_control"] == pytest.approx(0.4)
    assert arm["verdict"] == "difference"
    table = summary_markdown(s)
    assert "| better |" in table and "final val accuracy" in table and "higher is better" in table


def test_eval_task_paths_are_checked_up_front(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve(dict(model_name="tiny", eval_task=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="synthetic --dataset has its own accuracy"):
        resolve(dict(model_name="tiny", dataset="mqar", eval_task="evals/tiny_mc"))


def test_a_web_corpus_too_small_for_the_run_names_the_exact_preparation() -> None:
    """The seed's vanilla command trains 10,000 x 64 x 1,024 tokens: 655M, against a 100M default."""
    hint = more_data_hint("finewebedu", "./gpt2/data", 10_000 * 64 * 1024)
    assert hint == "python gpt2/prepare_data.py --dataset finewebedu --max-tokens 728177778 --force"
    assert more_data_hint("shakespeare", "./gpt2/data", 10**9) == ""  # nothing more to prepare


def test_a_synthetic_run_ends_without_a_text_sample(tmp_path, capsys) -> None:
    """GPT-2 text cannot be encoded into a task's vocabulary: the end-of-run sample is skipped."""
    flags = _mqar_flags(tmp_path / "run", max_iters=2, quiet=False, sample_tokens=20, eval_interval=2)
    train_once(resolve(flags))
    assert "---- sample ----" not in capsys.readouterr().out
