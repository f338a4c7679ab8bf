"""Ablations: arms one after another under the same seeds, data order, initial weights and budget.

An arm is a set of setting values on top of the ablation's own settings: one V-step
(``--ablation-mode --ablation-steps``) or one combination of the ``--ablate KEY=V1,V2`` axes.
Each (arm, seed) is an ordinary run of :func:`gpt2.trainer.run.train_once` on a configuration
resolved afresh from the ablation's inputs plus the arm's values (so derived settings follow
the arm), in ``<output-dir>/<arm>`` (``<output-dir>/<arm>/seed<N>`` with several seeds). The
row key is still called ``step`` (the arm's name) and the control is the first arm (V0 for a
V-step ablation that has it). A step that crashes is recorded and the others still run; a rerun with the same
output dir skips finished steps and resumes an unfinished one from its last checkpoint.
The summary (``ablation_summary.{json,md,csv}``, and the plots and HTML page of
:mod:`gpt2.track.report` in ``report/``) is rebuilt from the step folders after every run.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import itertools
import json
import math
import re
import statistics
import sys
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gpt2 import config_file, faults
from gpt2.config import AblationSection, RunConfig, ablation_axes, flatten, resolve, with_implied
from gpt2.errors import ConfigError, UserError
from gpt2.model.steps import get_step, parse_steps
from gpt2.track.metrics import read_metrics, write_json_atomic
from gpt2.track.report import interp, write_report
from gpt2.trainer import checkpoint
from gpt2.trainer.distributed import from_env
from gpt2.trainer.signals import STOP, Stopped

BASELINE = "V0"
SUMMARY = "ablation_summary"
REPORT_DIR = "report"  # gpt2.track.report's PNGs (loss vs tokens / vs wall time, ...) and report.html


@dataclass(frozen=True)
class Arm:
    """One arm of an ablation: its name (folder, row), setting values and what it is."""

    name: str
    values: dict[str, Any]
    description: str


def _label(value: Any) -> str:
    """A value as part of a folder name: short, and no path separators."""
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-.") or "arm"


def arms_of(cfg: RunConfig) -> tuple[list[Arm], str]:
    """The arms of ``cfg``'s ablation and the name of its control."""
    if cfg.ablation.ablate:
        axes = ablation_axes(cfg.ablation.ablate)
        arms = []
        for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
            values = with_implied(dict(combo))  # (an architecture axis wins)
            name = "_".join(f"{k}={_label(v)}" for k, v in combo) if len(axes) > 1 else _label(combo[0][1])
            desc = get_step(values["ra_step"]).description if len(axes) == 1 and "ra_step" in values else ""
            arms.append(Arm(name, values, desc or ", ".join(f"{k} = {_label(v)}" for k, v in combo)))
        names = [a.name for a in arms]
        if len(set(names)) < len(names):
            raise UserError(f"--ablate: two arms would share a folder name ({', '.join(names)})")
        return arms, arms[0].name
    steps = parse_steps(cfg.ablation.ablation_steps or "")
    arms = [Arm(s, with_implied({"ra_step": s}), get_step(s).description) for s in steps]
    return arms, (BASELINE if BASELINE in steps else steps[0])


def step_dir(out: Path, step: str, seed: int, several_seeds: bool) -> Path:
    return out / step / f"seed{seed}" if several_seeds else out / step


def arm_config(cfg: RunConfig, arm: Arm, seed: int, output_dir: Path) -> RunConfig:
    """A fresh configuration for one run of ``arm``: the ablation's inputs plus the arm's values,
    resolved again (derived settings follow the arm); ``cfg`` itself is never changed."""
    flat = flatten(cfg)
    ablation = {f.name for f in fields(AblationSection)} | {"json_output"}
    inputs = {k: flat[k] for k in cfg.explicit if k in flat and k not in ablation}
    inputs |= arm.values | {"seed": seed, "output_dir": str(output_dir)}
    if not cfg.train.dry_run:
        inputs["resume"] = "auto"  # an interrupted arm continues where its checkpoint left off
        inputs["save_checkpoint"] = True  # so that there is a checkpoint to continue from
    if cfg.track.tracker_run_name or cfg.track.tracker != "none":
        suffix = f"-{arm.name}" + (f"-seed{seed}" if cfg.ablation.ablation_seeds > 1 else "")
        inputs["tracker_run_name"] = (cfg.track.tracker_run_name or "ablation") + suffix
    try:
        return resolve(inputs, explicit=set(inputs))
    except ConfigError as e:
        raise UserError(f"ablation arm {arm.name}: {e}") from None


def _stopped_by_signal(results: dict[str, Any]) -> bool:
    return str(results.get("stop_reason", "")).startswith("signal")


def _finished(results_path: Path) -> bool:
    """Whether a run left results that it reached by its budget (a run stopped by a signal did not)."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return not _stopped_by_signal(json.loads(results_path.read_text()))
    return False


def _release_memory(compiled: bool = False) -> None:
    gc.collect()
    import torch

    if compiled:  # every arm compiles afresh: never the recompile limit's silent fall-back to eager
        torch._dynamo.reset()

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # each step reports its own peak


def _run_one(cfg: RunConfig, arm: Arm, seed: int, c: RunConfig) -> dict[str, Any]:
    """Train (or skip, or resume) one (arm, seed) with its config ``c``; returns a status record,
    never raises but ^C."""
    from gpt2.trainer.run import train_once

    out_dir = Path(c.output.output_dir)
    record: dict[str, Any] = {
        "step": arm.name,
        "seed": seed,
        "dir": str(out_dir),
        "description": arm.description,
    }
    if not cfg.train.dry_run and _finished(out_dir / "results.json"):
        print(
            f"{arm.name} (seed {seed}): finished earlier, results in {out_dir / 'results.json'}", flush=True
        )
        return {**record, "status": "done"}
    _release_memory(c.model.compile)
    try:
        faults.point("arm")
        results = train_once(c)
    except (Stopped, KeyboardInterrupt):
        return {**record, "status": "interrupted"}
    except Exception as e:  # crash isolation: record it, keep the other steps
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
        else:
            traceback.print_exc(file=sys.stderr)
        return {**record, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        _release_memory()
    if cfg.train.dry_run:
        return {**record, "status": "dry-run", "loss": results["loss"], "n_params": results["n_params"]}
    if _stopped_by_signal(results):
        return {**record, "status": "interrupted"}
    if not cfg.output.save_checkpoint and from_env().is_main:  # kept only to resume this step
        for name in (checkpoint.LAST, checkpoint.BEST):
            with contextlib.suppress(OSError):
                (out_dir / name).unlink()
    return {**record, "status": "done"}


def run_ablation(cfg: RunConfig) -> dict[str, Any]:
    """Run every step of ``--ablation-steps`` for each seed; returns the summary (also written to disk).

    After the summary is written: :class:`~.signals.Stopped` if a stop signal interrupted a run
    (rerun to continue), :class:`UserError` if a step failed (the others completed and are summarised).
    """
    arms, control = arms_of(cfg)
    seeds = [cfg.train.seed + k for k in range(cfg.ablation.ablation_seeds)]
    out = Path(cfg.output.output_dir)
    runs: list[dict[str, Any]] = []
    todo = [
        (arm, seed, arm_config(cfg, arm, seed, step_dir(out, arm.name, seed, several_seeds=len(seeds) > 1)))
        for arm, seed in itertools.product(arms, seeds)
    ]  # every arm's settings are checked before the first one trains
    if from_env().is_main and not cfg.train.dry_run:
        config_file.write(cfg, out / config_file.CONFIG_TOML)  # the whole ablation, replayable
    between = f"between ablation runs; rerun the same command to continue (finished runs are in {out})"
    with STOP.cancellable(between):
        for i, (arm, seed, c) in enumerate(todo, 1):
            where = c.output.output_dir
            print(
                f"=== ablation {i}/{len(todo)}: {arm.name} (seed {seed}) - {arm.description} -> {where}",
                flush=True,
            )
            runs.append(_run_one(cfg, arm, seed, c))
            if runs[-1]["status"] == "interrupted":
                break
    failed = [r for r in runs if r["status"] == "failed"]
    failures = "; ".join(f"{r['step']} (seed {r['seed']}): {r['error']}" for r in failed)
    if cfg.train.dry_run:
        print(f"ablation dry run: {len(runs) - len(failed)}/{len(todo)} steps ok")
        if failed:
            raise UserError(f"ablation dry run failed for {failures}")
        return {"runs": runs}
    if not from_env().is_main:  # under torchrun every rank trains; rank 0 alone summarises
        return {"runs": runs}
    summary = summarize(cfg, [a.name for a in arms], seeds, runs, control)
    write_summary(out, summary)
    print(summary_markdown(summary))
    if runs[-1]["status"] == "interrupted":
        raise Stopped(
            STOP.name,
            f"in run {runs[-1]['step']} (seed {runs[-1]['seed']}); rerun the same command to continue "
            f"(finished runs are kept in {out}, the stopped one resumes from its checkpoint)",
        )
    if failed:
        raise UserError(
            f"{len(failed)} of {len(runs)} ablation runs failed ({failures}); the others are in "
            f"{out / (SUMMARY + '.md')}"
        )
    return summary


# --------------------------------------------------------------------------- summary


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One (step, seed) row of the summary, from its results.json and metrics.jsonl."""
    row: dict[str, Any] = {
        "step": run["step"],
        "seed": run["seed"],
        "status": run["status"],
        "description": run.get("description", ""),
        "dir": run["dir"],
    }
    if run["status"] != "done":
        row["error"] = run.get("error")
        return row
    d = Path(run["dir"])
    r = json.loads((d / "results.json").read_text())
    metrics = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
    train = [m for m in metrics if "ms_per_step" in m]
    if train:
        ms = statistics.median(m["ms_per_step"] for m in train)
    else:
        ms = 1000 * r.get("train_time_s", r["wall_time_s"]) / max(1, r["iters"])
    tokens_per_step = r["tokens_seen"] / max(1, r["iters"])
    row.update(
        final_val_loss=r["final_val_loss"],
        best_val_loss=r["best_val_loss"],
        final_val_ppl=math.exp(min(r["final_val_loss"], 20.0)),
        best_val_ppl=math.exp(min(r["best_val_loss"], 20.0)),
        iters=r["iters"],
        tokens_seen=r["tokens_seen"],
        wall_time_s=r["wall_time_s"],
        train_time_s=r.get("train_time_s", r["wall_time_s"]),
        ms_per_step=ms,
        tokens_per_s=tokens_per_step / (ms / 1000) if ms > 0 else 0.0,
        peak_memory_mib=r["peak_memory_bytes"] / 2**20,
        n_params=r["n_params"],
        stop_reason=r["stop_reason"],
        final_sparsity=r.get("final_sparsity"),
        curve=[(m["tokens"], m["elapsed_s"], m["val_loss"]) for m in metrics if "val_loss" in m],
    )
    return row


def interpolate(curve: list[tuple[float, float, float]], axis: int, at: float) -> float | None:
    """The val loss of an eval curve ``[(tokens, train seconds, loss)]`` at ``at`` on ``axis`` (0 or 1),
    linearly between the evaluations around it; None outside the curve."""
    pts = sorted((p[axis], p[2]) for p in curve)
    return interp([x for x, _ in pts], [y for _, y in pts], at)


# A run whose last evaluation comes within this fraction after the equal-time budget (a
# time-budgeted run overshoots by at most one step) is scored by that evaluation at equal time.
EQUAL_TIME_SLACK = 0.02


def _equal_budgets(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The common token and training-time budget of the finished runs (the smallest run's), and
    each run's val loss there: arms compared at equal tokens and at equal training time."""
    done = [r for r in rows if r["status"] == "done" and r.get("curve")]
    if not done:
        return {"tokens": None, "train_time_s": None}
    budget = {
        "tokens": min(max(p[0] for p in r["curve"]) for r in done),
        "train_time_s": min(max(p[1] for p in r["curve"]) for r in done),
    }
    for r in done:
        r["val_loss_at_equal_tokens"] = interpolate(r["curve"], 0, budget["tokens"])
        at_time = interpolate(r["curve"], 1, budget["train_time_s"])
        if at_time is None:  # time-budgeted arms all end at the budget, give or take a step
            last = max(r["curve"], key=lambda p: p[1])
            if last[1] <= budget["train_time_s"] * (1 + EQUAL_TIME_SLACK):
                at_time = last[2]
        r["val_loss_at_equal_time"] = at_time
    return budget


def _t95(df: int) -> float:
    """Two-sided 95% Student-t critical value (table to df 10, then a close approximation)."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
    return table[df - 1] if df <= len(table) else 1.96 + 2.4 / df


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(
    cfg: RunConfig, steps: list[str], seeds: list[int], runs: list[dict[str, Any]], control: str
) -> dict[str, Any]:
    """Rows per run, aggregates per arm (mean ± std over seeds) and deltas against the control, paired
    by seed (same seed: same data order and, where shapes allow, the same initial weights)."""
    rows = [_run_row(r) for r in runs]
    equal = _equal_budgets(rows)
    done = {(r["step"], r["seed"]): r for r in rows if r["status"] == "done"}
    base = control
    for r in rows:
        b = done.get((base, r["seed"]))
        if r["status"] == "done" and b is not None:
            r["delta_val_loss_vs_control"] = r["final_val_loss"] - b["final_val_loss"]
            r["ms_per_step_vs_control"] = r["ms_per_step"] / b["ms_per_step"]
    per_step = []
    for step in steps:
        mine = [r for r in rows if r["step"] == step and r["status"] == "done"]
        described = [r["description"] for r in rows if r["step"] == step and r.get("description")]
        agg: dict[str, Any] = {
            "step": step,
            "description": described[0] if described else "",
            "runs_done": len(mine),
            "runs": sum(r["step"] == step for r in rows),
        }
        for key in (
            "final_val_loss",
            "best_val_loss",
            "final_val_ppl",
            "best_val_ppl",
            "tokens_seen",
            "tokens_per_s",
            "ms_per_step",
            "peak_memory_mib",
            "train_time_s",
            "wall_time_s",
            "final_sparsity",
            "val_loss_at_equal_tokens",
            "val_loss_at_equal_time",
        ):
            agg[key], agg[f"{key}_std"] = _mean_std([r[key] for r in mine if r.get(key) is not None])
        agg["n_params"] = mine[0]["n_params"] if mine else None
        deltas = [r["delta_val_loss_vs_control"] for r in mine if "delta_val_loss_vs_control" in r]
        agg["delta_val_loss_vs_control"], agg["delta_val_loss_vs_control_std"] = _mean_std(deltas)
        ratios = [r["ms_per_step_vs_control"] for r in mine if "ms_per_step_vs_control" in r]
        agg["ms_per_step_vs_control"] = statistics.fmean(ratios) if ratios else None
        # Paired t-test over seeds: same seed = same init (but the new gates) and the same data order.
        agg["beyond_seed_noise"], agg["delta_ci95"] = None, None
        if step != base and len(deltas) > 1:
            half = _t95(len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))
            mean = agg["delta_val_loss_vs_control"]
            agg["delta_ci95"] = [mean - half, mean + half]
            agg["beyond_seed_noise"] = abs(mean) > half  # the 95% interval excludes 0
        per_step.append(agg)
    return {
        "steps": steps,
        "seeds": seeds,
        "control": base,
        "equal_budget": equal,
        "by_step": per_step,
        "runs": rows,
        "model_name": cfg.model.model_name,
        "budget": {
            "max_iters": cfg.train.max_iters,
            "max_time_s": cfg.train.max_time,
            "tokens_per_step": cfg.tokens_per_step,
        },
        "dataset": cfg.data.dataset,
    }


def _fmt(v: Any, std: Any = None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    s = f"{v:,.{digits}f}"
    return s if std is None else f"{s} ± {std:,.{digits}f}"


def _ci(a: dict[str, Any]) -> str:
    ci = a.get("delta_ci95")
    return "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _equal_text(equal: dict[str, Any]) -> str:
    if equal.get("tokens") is None:
        return ""
    return (
        f" The equal-budget columns compare every arm at the smallest run's budget, {equal['tokens']:,.0f} "
        f"tokens and {equal['train_time_s']:.1f} s of training, its val loss interpolated between "
        f"evaluations (at equal time, a final evaluation up to {EQUAL_TIME_SLACK:.0%} later counts as "
        "at the budget)."
    )


def summary_latex(s: dict[str, Any]) -> str:
    """The summary as a booktabs table for a paper: arm, val loss, Δ with its 95% interval, ppl."""
    control = s["control"]
    sparsity = any(a.get("final_sparsity") is not None for a in s["by_step"])
    esc = lambda t: str(t).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
    cols = "lrrrr" + ("r" if sparsity else "")
    head = ["Arm", "Val loss", f"$\\Delta$ vs {esc(control)}", "95\\% CI", "Val ppl"] + (
        ["Sparsity"] if sparsity else []
    )
    lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(head) + r" \\", "\\midrule"]
    for a in s["by_step"]:
        ci = a.get("delta_ci95")
        cells = [
            esc(a["step"]),
            _fmt(a["final_val_loss"], a["final_val_loss_std"]).replace("±", "$\\pm$"),
            "--" if a["step"] == control else _fmt(a["delta_val_loss_vs_control"]),
            "--" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
            _fmt(a["final_val_ppl"], digits=2),
        ] + ([_fmt(a.get("final_sparsity"), digits=3)] if sparsity else [])
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def summary_markdown(s: dict[str, Any]) -> str:
    """The answer first: one row per arm, against the control, then what the columns mean."""
    b, control = s["budget"], s["control"]
    several = len(s["seeds"]) > 1
    sparsity = any(a.get("final_sparsity") is not None for a in s["by_step"])
    lines = [
        f"# Ablation summary ({s['model_name']}, dataset {s['dataset']})",
        "",
        f"| arm | final val loss | best val loss | val ppl | Δ vs {control} | 95% CI of Δ | beyond noise | "
        "val loss @ equal tokens | @ equal train time | "
        + ("sparsity | " if sparsity else "")
        + f"ms/step | vs {control} | tokens/s | tokens seen | train s | peak MiB | params | runs |",
        "|---|---|---|---|---|---|---|---|---|"
        + ("---|" if sparsity else "")
        + "---|---|---|---|---|---|---|---|",
    ]
    for a in s["by_step"]:
        lines.append(
            f"| {a['step']} | {_fmt(a['final_val_loss'], a['final_val_loss_std'])} | "
            f"{_fmt(a['best_val_loss'], a['best_val_loss_std'])} | {_fmt(a['final_val_ppl'], digits=2)} | "
            f"{_fmt(a['delta_val_loss_vs_control'], a['delta_val_loss_vs_control_std'])} | {_ci(a)} | "
            f"{_fmt(a['beyond_seed_noise'])} | "
            f"{_fmt(a.get('val_loss_at_equal_tokens'))} | {_fmt(a.get('val_loss_at_equal_time'))} | "
            + (f"{_fmt(a.get('final_sparsity'), digits=4)} | " if sparsity else "")
            + f"{_fmt(a['ms_per_step'], digits=1)} | {_fmt(a['ms_per_step_vs_control'], digits=3)} | "
            f"{_fmt(a['tokens_per_s'], digits=0)} | {_fmt(a['tokens_seen'], digits=0)} | "
            f"{_fmt(a['train_time_s'], digits=1)} | "
            f"{_fmt(a['peak_memory_mib'], digits=0)} | {_fmt(a['n_params'])} | {a['runs_done']}/{a['runs']} |"
        )
    lines += [
        "",
        f"Arms {', '.join(s['steps'])} (control: {control}); seeds {', '.join(map(str, s['seeds']))}; "
        f"budget per run: {b['max_iters']} steps"
        + (f" or {b['max_time_s']:g} s of training (evaluation excluded)" if b["max_time_s"] else "")
        + f", {b['tokens_per_step']:,} tokens/step. Δ is the final val loss minus the control's with "
        "the same seed (same data order and initial weights where shapes allow)"
        + (
            ", mean ± std over seeds; 'beyond noise': a paired t-test at 5% over seeds, i.e. whether the "
            "95% interval of Δ excludes 0 (no: the difference is inside the seed noise)."
            if several
            else "; with one seed there is no noise estimate (use --ablation-seeds)."
        )
        + _equal_text(s.get("equal_budget") or {})
        + " ms/step is the median over log windows (evaluation excluded); tokens/s follows from it. "
        "Peak memory: CUDA peak per run; on CPU the process's peak RSS so far.",
        "",
        "Arms: " + "; ".join(f"{a['step']}: {a['description']}" for a in s["by_step"]) + ".",
    ]
    problems = [r for r in s["runs"] if r["status"] != "done"]
    if problems:
        lines += ["", "Runs that did not finish:"]
        for r in problems:
            error = f" ({r['error']})" if r.get("error") else ""
            lines.append(f"- {r['step']} seed {r['seed']}: {r['status']}{error}")
    return "\n".join(lines)


CSV_FIELDS = (
    "step",
    "seed",
    "status",
    "final_val_loss",
    "best_val_loss",
    "final_val_ppl",
    "best_val_ppl",
    "delta_val_loss_vs_control",
    "iters",
    "tokens_seen",
    "train_time_s",
    "wall_time_s",
    "ms_per_step",
    "ms_per_step_vs_control",
    "final_sparsity",
    "val_loss_at_equal_tokens",
    "val_loss_at_equal_time",
    "tokens_per_s",
    "peak_memory_mib",
    "n_params",
    "stop_reason",
    "error",
    "dir",
    "description",
)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """ablation_summary.json/.md/.csv in ``out``; plots and report.html in ``out/report``."""
    write_json_atomic(out / f"{SUMMARY}.json", summary)
    (out / f"{SUMMARY}.md").write_text(summary_markdown(summary) + "\n")
    (out / f"{SUMMARY}.tex").write_text(summary_latex(summary) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary["runs"])
    (out / f"{SUMMARY}.csv").write_text(buf.getvalue())
    done = [r["dir"] for r in summary["runs"] if r["status"] == "done"]
    if done:  # loss against tokens and against wall time for every run, plus an HTML comparison
        arms: dict[str, list[str]] = {a["step"]: [] for a in summary["by_step"]}
        for r in summary["runs"]:
            if r["status"] == "done":
                arms[r["step"]].append(r["dir"])
        write_report(done, out / REPORT_DIR, answer=summary_markdown(summary), arms=arms)
