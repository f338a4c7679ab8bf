"""What the benchmark measures, as data: the workloads (presets), the published figures shown beside
them (anchors), and the cases, one row each. Adding a case is adding a row to ``CASES``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from gpt2.kernels.xent import FUSED_ENV

# Workloads: RunConfig overrides, exactly the configurations in which nanoGPT's figures below
# were measured, so the ratio compares the same work. nanoGPT ran unchanged but for the shape and
# batch, so with its own defaults: no biases and no dropout (our GPT-2 preset trains with both,
# as the earlier system did; the ``vanilla-ref`` case times that); one micro-batch per step.
AS_MEASURED: dict[str, Any] = dict(bias=False, dropout=0.0, gradient_accumulation=1, optimizer="adamw")
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_name="tiny", block_size=64, batch_size=8, dtype="float32", **AS_MEASURED),
    "gpt2-cpu": dict(model_name="gpt2", block_size=256, batch_size=4, dtype="float32", **AS_MEASURED),
    "gpt2-gpu": dict(
        model_name="gpt2", block_size=1024, batch_size=16, dtype="bfloat16", compile=True, **AS_MEASURED
    ),
}
DEFAULT_STEPS = {"tiny": 20, "gpt2-cpu": 5, "gpt2-gpu": 50}  # timed steps when --steps is not given


class Anchor(NamedTuple):
    """A published figure for a preset's workload, printed above our rows (from the issues)."""

    name: str
    ms_per_step: float
    peak_mib: float
    warmup_s: float | None = None
    mfu: float | None = None


# The first anchor of each preset is nanoGPT (commit 3adf61e), the "vs nanoGPT" column's reference.
ANCHORS: dict[str, list[Anchor]] = {
    "tiny": [Anchor("nanoGPT (2 AMD EPYC cores, fp32)", 308.0, 860)],
    "gpt2-cpu": [Anchor("nanoGPT (2 AMD EPYC cores, fp32)", 5850.0, 3.3 * 1024)],
    "gpt2-gpu": [
        Anchor("nanoGPT (H100, torch 2.11)", 35.9, 12.4e9 / 2**20, 28, 0.394),
        Anchor("earlier system V0 (H100)", 37.4, 12.4e9 / 2**20, 29, 0.379),
        Anchor("earlier system V1 (H100)", 40.1, 13.3e9 / 2**20, 145, 0.353),
    ],
}


@dataclass(frozen=True)
class Case:
    """One row of the table: what it changes on top of the preset (RunConfig overrides) and how it
    is measured: ``step`` times the real training step, ``reference`` nanoGPT's computation,
    ``generate`` generation with and without the KV cache (see :data:`gpt2.bench.workers.MEASURES`);
    ``env``: environment of its worker process (the switches that are not run settings)."""

    name: str
    note: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    measure: str = "step"
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("overrides", "env"):  # rows stay rows
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


def ra(step: str, **more: Any) -> dict[str, Any]:
    """The overrides of a Unified RA case: the V-step, and anything else it changes."""
    return dict(architecture="unified-ra", ra_step=step, **more)


def _by_name(*cases: Case) -> dict[str, Case]:
    """The registry, in the order given (``--cases all``); a name given twice is refused on import."""
    names = [c.name for c in cases]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"benchmark cases named twice: {repeated}")
    return {c.name: c for c in cases}


# Every architecture, V-series mechanism, optimizer and pruning method. A case whose capability is
# not built on this machine is a row saying why.
CASES: dict[str, Case] = _by_name(
    Case("reference", "nanoGPT's computation on the preset's model", measure="reference"),
    Case(
        "generate",
        "200 new tokens with and without the KV cache (a line below the table)",
        measure="generate",
    ),
    Case("vanilla", "the preset's model, as nanoGPT configures it"),
    Case("vanilla-aten", "the loss's softmax on ATen's ops, not the fused kernel", env={FUSED_ENV: "0"}),
    Case("vanilla-ref", "the GPT-2 preset's (and earlier system's) defaults", dict(bias=True, dropout=0.1)),
    Case(
        "vanilla-cudnn",
        "cuDNN attention instead of PyTorch's flash-first order",
        dict(sdpa_backend="cudnn"),
    ),
    Case("V0", "the control step (baseline model) with the Unified RA extension", ra("V0")),
    Case("V1", "Unified RA", ra("V1")),
    Case("V2", "+ self-restart", ra("V2")),
    Case("V3", "+ R-MLP", ra("V3")),
    Case("V6", "every mechanism", ra("V6")),
    Case("V1-cudnn", "V1 with cuDNN attention", ra("V1", sdpa_backend="cudnn")),
    Case("V12", "+ a gate schedule (frozen gates)", ra("V12")),
    Case("V14", "KV pruning, masked scores", ra("V14")),
    Case("V14-gather", "KV pruning, gathered keys", ra("V14", kv_gather=True)),
    Case("V15", "learned keep ratio", ra("V15")),
    Case("V19", "V-only pruning", ra("V19")),
    Case("C3", "+ V compressed to 8 dims", ra("C3")),
    Case("muon", "Muon on the blocks' matrices, AdamW on the rest", dict(optimizer="muon")),
    Case("adamwspam", "the command line's defaults: resets, no clipping", dict(optimizer="adamwspam")),
    Case("adamwspam-clip", "with spike clipping", dict(optimizer="adamwspam", spam_enable_clip=True)),
    Case(
        "bitter7",
        "AdamWPrune's bitter7 scores, state pruning",
        dict(optimizer="adamwprune", adamwprune_variant="bitter7", pruning_method="state"),
    ),
    Case("magnitude", "magnitude pruning", dict(pruning_method="magnitude")),
    Case("movement", "movement pruning", dict(pruning_method="movement")),
)
# ``--cases core``: the rows the GPU issue's targets are stated for, in this order.
CORE = ("reference", "vanilla", "V0", "V1", "adamwspam", "bitter7", "vanilla-cudnn")


def case_values(preset: str, spec: str, extra: Mapping[str, Any], device: str) -> dict[str, Any]:
    """The RunConfig values of one case, ``NAME`` or ``NAME:DTYPE`` (that dtype instead of the
    preset's): the preset, the case's overrides, then ``--set``'s."""
    name, _, dtype = spec.partition(":")
    values = {**PRESETS[preset], **CASES[name].overrides, **extra, "device": device, "quiet": True}
    if dtype:
        values["dtype"] = dtype
    return values
