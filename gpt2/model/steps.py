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
)

_RA = dict(attention="unified_ra")
_RMLP = dict(attention="unified_ra", mlp="reciprocal")

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
    return replace(config, **{**BASE, **get_step(name).overrides})


def format_steps_table() -> str:
    """The V-step table as Markdown, generated from the registry (``--list-steps``)."""
    rows = [
        "| step | attention | R | self-restart | MLP | R_ff | mixer | gate alpha | expansion | description |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in _STEPS:
        c = apply_step(GPTConfig(), step.name)
        ra = c.attention == "unified_ra"
        rmlp = c.mlp == "reciprocal"
        yes = lambda flag: "yes" if flag else "-"
        rows.append(
            f"| {step.name} | {c.attention} | {c.ra_rank if ra else '-'} | {yes(c.self_restart)} | {c.mlp} | "
            f"{c.rmlp_rank if rmlp else '-'} | {yes(c.rmlp_mixer)} | {yes(c.rmlp_gates)} | "
            f"{c.mlp_expansion:g}x | {step.description} |"
        )
    return "\n".join(rows)
