"""What ``--architecture unified-ra`` adds to the one training loop: gate analysis.

The model itself follows from the run configuration (:meth:`gpt2.config.RunConfig.gpt_config`
applies the V-step); this extension records gate statistics at every evaluation (they reach
metrics.jsonl and the trackers through the loop), plots them at the end and names the step in
results.json.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import nn

from gpt2.config import RunConfig
from gpt2.model.gates import gate_stats
from gpt2.model.steps import get_step
from gpt2.track.metrics import read_metrics
from gpt2.trainer.extension import Extension

GATES_PNG = "gates.png"


class UnifiedRAExtension(Extension):
    """Logs the gates of a V-step's model."""

    name = "unified_ra"

    def __init__(self, step: str, *, output_dir: str | Path | None = None) -> None:
        self.step = get_step(step)
        self.output_dir = Path(output_dir) if output_dir is not None else None  # None: no plot

    @classmethod
    def from_config(cls, cfg: RunConfig) -> UnifiedRAExtension:
        assert cfg.model.ra_step is not None, "resolve() sets the step of --architecture unified-ra"
        return cls(cfg.model.ra_step, output_dir=None if cfg.train.dry_run else cfg.output.output_dir)

    def eval_metrics(self, model: nn.Module) -> dict[str, float]:
        return gate_stats(model)

    def final_results(self, model: nn.Module) -> dict[str, Any]:
        gates = gate_stats(model)
        out: dict[str, Any] = {
            "ra_step": self.step.name,
            "ra_step_description": self.step.description,
            "final_gates": gates,
        }
        if gates and self.output_dir is not None:
            png = plot_gate_history(self.output_dir / "metrics.jsonl", self.output_dir / GATES_PNG)
            if png is not None:
                out["gates_plot"] = str(png)
        return out


def plot_gate_history(metrics_path: Path, png_path: Path) -> Path | None:
    """Plot each gate family's mean (line) and min-max range (band) against the step.

    Reads the ``gates/<family>_{mean,min,max}`` keys of ``metrics.jsonl``'s evaluation records;
    returns the PNG path, or None when there is nothing to plot or matplotlib is missing.
    """
    records = [r for r in read_metrics(metrics_path) if any(k.startswith("gates/") for k in r)]
    families = sorted(
        {
            k[len("gates/") : -len("_mean")]
            for r in records
            for k in r
            if k.startswith("gates/") and k.endswith("_mean") and "/L" not in k
        }
    )
    if not families:
        return None
    groups = {
        title: [f for f in families if f.startswith(prefix)]
        for prefix, title in (("attn_", "attention gates"), ("mlp_", "R-MLP gates"), ("kv_", "KV keep ratio"))
    }
    groups = {title: fams for title, fams in groups.items() if fams}
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("warning: matplotlib is not installed; no gate plot (pip install matplotlib)", file=sys.stderr)
        return None
    opened = [r["step"] for r in read_metrics(metrics_path) if r.get("event") == "gates_opened"]
    fig = Figure(figsize=(6.0 * len(groups), 3.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg directly: no pyplot, no global backend state
    fig.subplots(1, len(groups), squeeze=False)
    for ax, (title, fams) in zip(fig.axes, groups.items()):
        for fam in fams:
            rows = [r for r in records if r.get(f"gates/{fam}_mean") is not None]
            steps = [r["step"] for r in rows]
            (line,) = ax.plot(steps, [r[f"gates/{fam}_mean"] for r in rows], label=fam)
            low, high = [r[f"gates/{fam}_min"] for r in rows], [r[f"gates/{fam}_max"] for r in rows]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        for step in opened:  # a gate schedule opened the reciprocal gates here
            ax.axvline(step, color="black", linestyle="--", linewidth=1, label=f"gates opened (step {step})")
        ax.set_title(f"{title} (mean, min-max over layers and heads)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
