"""The V-series registry (reference §4.2): step name -> description and model-config overrides.

This table is the only place that defines the steps; ``--ra-step``/``--ablation-steps``
validation, ``--list-steps`` and the ablation read it. Adding a step is one row.

Every step is applied on top of ``BASE``, never on top of another step, so no setting
leaks from one step to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gpt2.model.config import GPTConfig


@dataclass(frozen=True)
class Step:
    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)


# The fields the V-series controls, at their values for a step that does not mention them.
BASE: dict[str, Any] = dict(
    attention="standard",
    mlp="standard",
    mlp_expansion=4.0,
    ra_rank=4,
    self_restart=False,
    rmlp_rank=64,
    rmlp_mixer=False,
    rmlp_gates=False,
    gate_schedule="none",
    kv_keep=0.382,
    kv_recent=0.0625,
    kv_learned=False,
    kv_v_rank=0,
)
# The "golden ratio" R-MLP split: 1152 of GPT-2's 3072 hidden channels reciprocal (1920:1152);
# other widths keep the share. An override, resolved against the model's width by apply_step.
GOLDEN_RMLP_SHARE = 1152 / 3072

_RA = dict(attention="unified_ra")
_RMLP = dict(attention="unified_ra", mlp="reciprocal")
_RMLP_ONLY = dict(mlp="reciprocal")  # standard attention, reciprocal MLP
_GOLDEN = dict(mlp="reciprocal", rmlp_share=GOLDEN_RMLP_SHARE)
_DELAYED = dict(gate_schedule="delayed")
_VARIANCE = dict(gate_schedule="variance")
_KV = dict(attention="kv_pruned")
_V19 = dict(attention="v_pruned")

_STEPS = (
    Step("V0", "baseline GPT-2, standard SDPA attention (control)"),
    Step("V1", "Unified RA, R=4, folded layout", {**_RA}),
    Step("V2", "Unified RA R=4 + self-restart", {**_RA, "self_restart": True}),
    Step("V3", "Unified RA R=4 + R-MLP (basic, R_ff=64)", {**_RMLP}),
    Step("V4", "Unified RA R=4 + R-MLP + mixer", {**_RMLP, "rmlp_mixer": True}),
    Step("V5", "Unified RA R=4 + R-MLP + gates", {**_RMLP, "rmlp_gates": True}),
    Step(
        "V6",
        "Unified RA R=4 + R-MLP + mixer + gates (all mechanisms)",
        {**_RMLP, "rmlp_mixer": True, "rmlp_gates": True},
    ),
    Step("V7", "Unified RA, R=8 (higher capacity)", {**_RA, "ra_rank": 8}),
    Step("V8", "Unified RA R=8 + self-restart", {**_RA, "ra_rank": 8, "self_restart": True}),
    Step("V9", "Unified RA, R=2 (minimal capacity)", {**_RA, "ra_rank": 2}),
    Step(
        "V10", "Unified RA R=4 + self-restart + 6x MLP", {**_RA, "self_restart": True, "mlp_expansion": 6.0}
    ),
    Step("V11", "baseline attention + R-MLP (R_ff=64), gates delayed", {**_RMLP_ONLY, **_DELAYED}),
    Step("V12", "Unified RA R=4, gates delayed", {**_RA, **_DELAYED}),
    Step("V13", "baseline attention + golden R-MLP (1920:1152), gates delayed", {**_GOLDEN, **_DELAYED}),
    Step("V14", "V11 + KV pruning (k=0.382 T, recent 64)", {**_RMLP_ONLY, **_DELAYED, **_KV}),
    Step(
        "V15",
        "V13 + KV pruning with a learned keep ratio (init 0.382)",
        {**_GOLDEN, **_DELAYED, **_KV, "kv_learned": True},
    ),
    Step("V16", "Unified RA R=4, per-head gates, variance-guided", {**_RA, **_VARIANCE}),
    Step("V17", "R-MLP (R_ff=64) + KV pruning, variance-guided, no RA", {**_RMLP_ONLY, **_VARIANCE, **_KV}),
    Step(
        "V18",
        "golden R-MLP + learned KV pruning, variance-guided, no RA",
        {**_GOLDEN, **_VARIANCE, **_KV, "kv_learned": True},
    ),
    Step("V19", "baseline + V-only KV pruning (keep 0.382, recent 64)", {**_V19}),
    Step("C1", "V19 + V compressed to 32 dims per head", {**_V19, "kv_v_rank": 32}),
    Step("C2", "V19 + V compressed to 16 dims per head", {**_V19, "kv_v_rank": 16}),
    Step("C3", "V19 + V compressed to 8 dims per head", {**_V19, "kv_v_rank": 8}),
)
STEPS: dict[str, Step] = {s.name: s for s in _STEPS}


def get_step(name: str) -> Step:
    """The step called ``name``; ``ValueError`` listing the known steps otherwise."""
    try:
        return STEPS[name]
    except KeyError:
        raise ValueError(f"unknown V-step {name!r}; known steps: {', '.join(STEPS)}") from None


def parse_steps(text: str) -> list[str]:
    """``"V0, V1,V3"`` -> ``["V0", "V1", "V3"]``; unknown, repeated or no steps -> ``ValueError``."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("no V-steps given")
    for name in names:
        get_step(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"V-step(s) listed twice: {', '.join(repeated)}")
    return names


def apply_step(config: GPTConfig, name: str) -> GPTConfig:
    """A copy of ``config`` with step ``name``'s architecture (shapes and other fields kept)."""
    overrides = {**BASE, **get_step(name).overrides}
    share = overrides.pop("rmlp_share", None)
    built = replace(config, **overrides)
    return built if share is None else replace(built, rmlp_rank=round(share * built.mlp_width))


def format_steps_table() -> str:
    """The V-step table as Markdown, generated from the registry (``--list-steps``)."""
    rows = [
        "| step | attention | R | self-restart | MLP | R_ff | mixer | gate alpha | expansion | gates | "
        "KV keep | description |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in _STEPS:
        c = apply_step(GPTConfig(), step.name)  # GPT-2 124M shapes
        ra = c.attention == "unified_ra"
        rmlp = c.mlp == "reciprocal"
        kv = c.attention in ("kv_pruned", "v_pruned")
        recent = round(c.kv_recent * c.block_size)
        keep = f"{round(c.kv_keep * c.block_size)}{' learned' if c.kv_learned else ''} + {recent}"
        if kv and c.kv_v_rank:
            keep += f", V to {c.kv_v_rank}"
        yes = lambda flag: "yes" if flag else "-"
        rows.append(
            f"| {step.name} | {c.attention} | {c.ra_rank if ra else '-'} | {yes(c.self_restart)} | {c.mlp} | "
            f"{c.rmlp_rank if rmlp else '-'} | {yes(c.rmlp_mixer)} | {yes(c.rmlp_gates)} | "
            f"{c.mlp_expansion:g}x | {c.gate_schedule if c.has_reciprocal_gates else '-'} | "
            f"{keep if kv else '-'} | {step.description} |"
        )
    return "\n".join(rows)
