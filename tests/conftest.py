"""Shared fixtures: a small local corpus and the flags of a fast tiny run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2.model import GPTConfig

REPO = Path(__file__).resolve().parent.parent

# Tests of device-specific paths run on every device this machine has (CI: the CPU only).
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

_WORDS = (
    "the king queen lord lady sword crown castle night day love death war peace heart blood "
    "speak hear see come go stay fly fight sleep dream wake rise fall old young fair foul"
).split()


def write_corpus(folder: Path, n_docs: int = 12, n_sentences: int = 120, seed: int = 0) -> Path:
    """A folder of small text documents with learnable structure (a few templates, random words)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(n_sentences):
            a, b, c = rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_WORDS)
            lines.append(
                rng.choice([f"The {a} shall {b} the {c}.", f"O {a}, thou {b} {c}!", f"My {a} is {b}."])
            )
        (folder / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "texts")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def tiny_run_flags(corpus_dir: Path, data_dir: Path, output_dir: Path | None = None, **overrides) -> dict:
    """Settings of a tiny CPU run on the local corpus, as RunConfig field values."""
    flags = dict(
        model_name="tiny",
        n_layer=2,
        block_size=32,
        batch_size=4,
        max_iters=8,
        log_interval=2,
        eval_interval=4,
        eval_samples=2,
        optimizer="adamw",  # the path these tests were written for (the tiny preset's own is Muon)
        dataset=str(corpus_dir),
        data_dir=str(data_dir),
        device="cpu",
        dtype="float32",  # exact equivalence tests; bf16 runs are tested where they are meant
        quiet=True,
        sample_tokens=0,
    )
    if output_dir is not None:
        flags["output_dir"] = str(output_dir)
    return flags | overrides


@pytest.fixture
def tiny_flags(corpus_dir: Path, data_dir: Path, tmp_path: Path) -> dict:
    return tiny_run_flags(corpus_dir, data_dir, tmp_path / "out")


@pytest.fixture(autouse=True, scope="session")
def _offline_env() -> None:
    """Tests never reach the network; trackers stay local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")


@dataclass(frozen=True)
class LmEvalRun:
    """A tiny trained checkpoint, its transformers export, and lm-eval's run on evals/tiny_mc."""

    checkpoint: Path
    hf_dir: Path
    stdout: str
    results: dict  # lm-eval's results.json "results" entry of the task
    samples: list[dict]  # lm-eval's logged samples, in doc_id order
    run_results: dict  # the training run's results.json (it scored evals/tiny_mc in the loop)


@pytest.fixture(scope="session")
def lm_eval_tiny_mc(corpus_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LmEvalRun:
    """Train 4 steps, export, run lm-eval (offline, samples logged) on evals/tiny_mc: once per session,
    as lm-eval's start-up is the slow part and several tests read the same run."""
    pytest.importorskip("lm_eval")
    from gpt2.config import resolve
    from gpt2.export import export
    from gpt2.trainer import checkpoint
    from gpt2.trainer.run import train_once

    root = tmp_path_factory.mktemp("lm_eval")
    flags = tiny_run_flags(
        corpus_dir, data_dir, root / "out", max_iters=4, save_checkpoint=True, checkpoint_interval=4,
        eval_task=str(REPO / "evals" / "tiny_mc"),
    )  # fmt: skip
    run_results = train_once(resolve(flags))
    ckpt, hf = root / "out" / checkpoint.LAST, root / "hf"
    export(ckpt, hf)
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf}",
        "--include_path", "evals/tiny_mc", "--tasks", "gpt2_tiny_mc", "--device", "cpu", "--batch_size", "4",
        "--log_samples", "--output_path", str(root / "lm_eval"),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(root / "ds"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (root / "lm_eval").rglob("results_*.json")
    (samples_file,) = (root / "lm_eval").rglob("samples_gpt2_tiny_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    return LmEvalRun(
        checkpoint=ckpt,
        hf_dir=hf,
        stdout=proc.stdout,
        results=json.loads(results_file.read_text())["results"]["gpt2_tiny_mc"],
        samples=sorted(samples, key=lambda s: s["doc_id"]),
        run_results=run_results,
    )


_NEGATABLE = {"bias", "decay_lr", "ddp_find_unused_params"}


def as_argv(flags: dict) -> list[str]:
    """RunConfig field values -> command-line flags."""
    argv = []
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is False:
            if k in _NEGATABLE:
                argv.append("--no-" + k.replace("_", "-"))
        elif v is not None:
            argv += [flag, str(v)]
    return argv


def small_gpt_config(**overrides) -> GPTConfig:
    """A 2-layer model of 4 heads x 16 channels (64 wide), vocab 96, block 32, no dropout, biases."""
    base = dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    return GPTConfig(**(base | overrides))


class OpNames(TorchDispatchMode):
    """Records the name of every aten op that runs (``overload.name``, e.g. ``exp_.default``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``bool()``, ``float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
