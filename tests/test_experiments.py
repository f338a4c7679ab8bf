"""The shipped experiment files: each states its claim, parses, and runs at CPU scale with overrides."""

from __future__ import annotations

import json

import pytest

from gpt2.cli import parse
from gpt2.experiments import EXPERIMENTS_DIR, experiments
from gpt2.launch.plan import arms_of
from gpt2.train import run
from tests.conftest import as_argv, tiny_run_flags

NAMES = [e.name for e in experiments()]


def test_every_documented_experiment_is_shipped_with_its_claim() -> None:
    expected = {
        "sanity-10min",
        "ra-ablation-production",
        "bitter7-pruning-50",
        "b200-spam-magnitude",
        "b200-bitter7",
        "ddp-4gpu-ra",
        "tiny-preset-sweep",
        "mqar-zoology-attention",
        "mqar-v-series",
    }
    assert expected <= set(NAMES)
    for e in experiments():
        assert len(e.claim) > 40, e.name  # a sentence, with its figures


def test_list_experiments_prints_them(capsys) -> None:
    assert run(parse(["--list-experiments"])) == 0
    out = capsys.readouterr().out
    assert all(f"--config experiments/{name}.toml" in out for name in NAMES)


def cpu_scale(corpus_dir, data_dir, out_dir, synthetic: bool = False) -> list[str]:
    flags = tiny_run_flags(corpus_dir, data_dir, out_dir, max_iters=6, max_time=0)
    del flags["optimizer"]  # the file's own (or ablated by it)
    flags |= dict(gradient_accumulation=1, warmup_steps=2, tracker="none", eval_interval=3, eval_samples=1)
    if synthetic:  # a probe task keeps its dataset, its block and its model shape; fewer examples
        for key in ("dataset", "data_dir", "block_size", "n_layer"):
            del flags[key]
        flags |= dict(task_train_examples=500, task_val_examples=64)
    return as_argv(flags)


@pytest.mark.parametrize("name", NAMES)
def test_experiment_parses_as_written(name) -> None:
    cfg = parse(["--config", str(EXPERIMENTS_DIR / f"{name}.toml"), "--output-dir", "/nonexistent/x"])
    assert cfg.train.max_time > 0 or cfg.train.max_iters > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_experiment_runs_at_cpu_scale(name, corpus_dir, data_dir, tmp_path) -> None:
    path = EXPERIMENTS_DIR / f"{name}.toml"
    written = parse(["--config", str(path), "--output-dir", str(tmp_path / "unused")])
    synthetic = written.task_params is not None
    argv = ["--config", str(path), *cpu_scale(corpus_dir, data_dir, tmp_path / "out", synthetic)]
    if written.pruning.pruning_method != "none":
        argv += ["--pruning-warmup", "2", "--pruning-frequency", "2"]
    cfg = parse(argv)
    assert run(cfg) == 0
    if cfg.ablation.ablation_mode or cfg.ablation.ablate:
        summary = json.loads((tmp_path / "out" / "ablation_summary.json").read_text())
        arms = len(arms_of(cfg)[0]) * cfg.ablation.ablation_seeds
        assert all(r["status"] == "done" for r in summary["runs"]) and len(summary["runs"]) == arms
        return
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["iters"] == 6
    for sec in ("optim", "pruning"):  # the file's method survives the CPU-scale overrides
        assert results["config"][sec]["optimizer" if sec == "optim" else "pruning_method"] == getattr(
            getattr(written, sec), "optimizer" if sec == "optim" else "pruning_method"
        )
    if written.pruning.pruning_method != "none":
        assert abs(results["final_sparsity"] - written.pruning.target_sparsity) < 0.005
