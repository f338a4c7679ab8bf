"""Shared fixtures: a small local corpus and the flags of a fast tiny run."""

from __future__ import annotations

import os
import random
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
