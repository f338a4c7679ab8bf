"""Ablation mode: V-steps one after another under the same seed, data order and budget.

Each (step, seed) is an ordinary run of :func:`gpt2.trainer.run.train_once` on its own copy
of the configuration, in ``<output-dir>/<step>`` (``<output-dir>/<step>/seed<N>`` with several
seeds). A step that crashes is recorded and the others still run; a rerun with the same
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
import statistics
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from gpt2.config import AblationSection, RunConfig, validate
from gpt2.errors import UserError
from gpt2.model.steps import get_step, parse_steps
from gpt2.track.metrics import read_metrics, write_json_atomic
from gpt2.track.report import write_report
from gpt2.trainer import checkpoint
from gpt2.trainer.distributed import from_env

BASELINE = "V0"
SUMMARY = "ablation_summary"
REPORT_DIR = "report"  # gpt2.track.report's PNGs (loss vs tokens / vs wall time, ...) and report.html


def step_dir(out: Path, step: str, seed: int, several_seeds: bool) -> Path:
    return out / step / f"seed{seed}" if several_seeds else out / step


def step_config(cfg: RunConfig, step: str, seed: int, output_dir: Path) -> RunConfig:
    """A fresh, validated copy of ``cfg`` for one run of ``step``; ``cfg`` itself is never changed."""
    c = RunConfig.from_dict(cfg.to_dict())
    c.ablation = AblationSection()
    c.model.architecture = "unified-ra"
    c.model.ra_step = step
    c.train.seed = seed
    c.output.output_dir = str(output_dir)
    c.output.json_output = None
    if not c.train.dry_run:
        c.output.resume = "auto"  # an interrupted step continues where its checkpoint left off
        c.output.save_checkpoint = True  # so that there is a checkpoint to continue from
    if c.track.tracker_run_name or c.track.tracker != "none":
        suffix = f"-{step}" + (f"-seed{seed}" if cfg.ablation.ablation_seeds > 1 else "")
        c.track.tracker_run_name = (cfg.track.tracker_run_name or "ablation") + suffix
    # the arm's own inputs (its config.toml replays the arm, not the whole ablation)
    arm = {"architecture", "ra_step", "seed", "output_dir", "resume", "save_checkpoint", "tracker_run_name"}
    ablation = {f.name for f in fields(AblationSection)} | {"json_output"}
    c.explicit = tuple(sorted((set(cfg.explicit) - ablation) | arm))
    validate(c)
    return c


def _stopped_by_signal(results: dict[str, Any]) -> bool:
    return str(results.get("stop_reason", "")).startswith("signal")


def _finished(results_path: Path) -> bool:
    """Whether a run left results that it reached by its budget (a run stopped by a signal did not)."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return not _stopped_by_signal(json.loads(results_path.read_text()))
    return False


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # each step reports its own peak


def _run_one(cfg: RunConfig, step: str, seed: int, out_dir: Path) -> dict[str, Any]:
    """Train (or skip, or resume) one (step, seed); returns a status record, never raises but ^C."""
    from gpt2.trainer.run import train_once

    record: dict[str, Any] = {"step": step, "seed": seed, "dir": str(out_dir)}
    if not cfg.train.dry_run and _finished(out_dir / "results.json"):
        print(f"{step} (seed {seed}): finished earlier, results in {out_dir / 'results.json'}", flush=True)
        return {**record, "status": "done"}
    c = step_config(cfg, step, seed, out_dir)
    _release_memory()
    try:
        results = train_once(c)
    except KeyboardInterrupt:
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

    After the summary is written: ``KeyboardInterrupt`` if a step was interrupted (rerun to
    continue), :class:`UserError` if a step failed (the others completed and are summarised).
    """
    steps = parse_steps(cfg.ablation.ablation_steps or "")
    seeds = [cfg.train.seed + k for k in range(cfg.ablation.ablation_seeds)]
    out = Path(cfg.output.output_dir)
    runs: list[dict[str, Any]] = []
    todo = list(itertools.product(steps, seeds))
    for i, (step, seed) in enumerate(todo, 1):
        d = step_dir(out, step, seed, several_seeds=len(seeds) > 1)
        desc = get_step(step).description
        print(f"=== ablation {i}/{len(todo)}: {step} (seed {seed}) - {desc} -> {d}", flush=True)
        runs.append(_run_one(cfg, step, seed, d))
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
    summary = summarize(cfg, steps, seeds, runs)
    write_summary(out, summary)
    print(summary_markdown(summary))
    if runs[-1]["status"] == "interrupted":
        print(
            f"ablation interrupted; rerun the same command to continue (finished steps are kept in {out})",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
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
        "description": get_step(run["step"]).description,
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
    )
    return row


def _t95(df: int) -> float:
    """Two-sided 95% Student-t critical value (table to df 10, then a close approximation)."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
    return table[df - 1] if df <= len(table) else 1.96 + 2.4 / df


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(
    cfg: RunConfig, steps: list[str], seeds: list[int], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Rows per run, aggregates per step (mean ± std over seeds) and deltas against V0 (paired by seed)."""
    rows = [_run_row(r) for r in runs]
    done = {(r["step"], r["seed"]): r for r in rows if r["status"] == "done"}
    base = BASELINE if BASELINE in steps else None
    for r in rows:
        b = done.get((base, r["seed"]))
        if r["status"] == "done" and b is not None:
            r["delta_val_loss_vs_V0"] = r["final_val_loss"] - b["final_val_loss"]
            r["ms_per_step_vs_V0"] = r["ms_per_step"] / b["ms_per_step"]
    per_step = []
    for step in steps:
        mine = [r for r in rows if r["step"] == step and r["status"] == "done"]
        agg: dict[str, Any] = {
            "step": step,
            "description": get_step(step).description,
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
        ):
            agg[key], agg[f"{key}_std"] = _mean_std([r[key] for r in mine])
        agg["n_params"] = mine[0]["n_params"] if mine else None
        deltas = [r["delta_val_loss_vs_V0"] for r in mine if "delta_val_loss_vs_V0" in r]
        agg["delta_val_loss_vs_V0"], agg["delta_val_loss_vs_V0_std"] = _mean_std(deltas)
        ratios = [r["ms_per_step_vs_V0"] for r in mine if "ms_per_step_vs_V0" in r]
        agg["ms_per_step_vs_V0"] = statistics.fmean(ratios) if ratios else None
        # Paired t-test over seeds: same seed = same init (but the new gates) and the same data order.
        agg["beyond_seed_noise"] = None
        if step != base and len(deltas) > 1:
            se = statistics.stdev(deltas) / math.sqrt(len(deltas))
            agg["beyond_seed_noise"] = abs(agg["delta_val_loss_vs_V0"]) > _t95(len(deltas) - 1) * se
        per_step.append(agg)
    return {
        "steps": steps,
        "seeds": seeds,
        "baseline": base,
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


def summary_markdown(s: dict[str, Any]) -> str:
    b = s["budget"]
    several = len(s["seeds"]) > 1
    lines = [
        f"# Ablation summary ({s['model_name']}, dataset {s['dataset']})",
        "",
        f"Steps {', '.join(s['steps'])}; seeds {', '.join(map(str, s['seeds']))}; budget per run: "
        f"{b['max_iters']} steps"
        + (f" or {b['max_time_s']:g} s" if b["max_time_s"] else "")
        + f", {b['tokens_per_step']:,} tokens/step. ms/step is the median over log windows (evaluation "
        "excluded); tokens/s follows from it. Peak memory: CUDA peak per run; on CPU the process's "
        "peak RSS so far. "
        "Δ is the final val loss minus V0's with the same seed"
        + (" (mean ± std over seeds); 'beyond noise': a paired t-test at 5% over seeds." if several else "."),
        "",
        "| step | final val loss | best val loss | val ppl | Δ vs V0 | beyond noise | ms/step | vs V0 | "
        "tokens/s | tokens seen | peak MiB | params | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in s["by_step"]:
        lines.append(
            f"| {a['step']} | {_fmt(a['final_val_loss'], a['final_val_loss_std'])} | "
            f"{_fmt(a['best_val_loss'], a['best_val_loss_std'])} | {_fmt(a['final_val_ppl'], digits=2)} | "
            f"{_fmt(a['delta_val_loss_vs_V0'], a['delta_val_loss_vs_V0_std'])} | "
            f"{_fmt(a['beyond_seed_noise'])} | "
            f"{_fmt(a['ms_per_step'], digits=1)} | {_fmt(a['ms_per_step_vs_V0'], digits=3)} | "
            f"{_fmt(a['tokens_per_s'], digits=0)} | {_fmt(a['tokens_seen'], digits=0)} | "
            f"{_fmt(a['peak_memory_mib'], digits=0)} | {_fmt(a['n_params'])} | {a['runs_done']}/{a['runs']} |"
        )
    lines += ["", "Steps: " + "; ".join(f"{a['step']} {a['description']}" for a in s["by_step"]) + "."]
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
    "delta_val_loss_vs_V0",
    "iters",
    "tokens_seen",
    "train_time_s",
    "wall_time_s",
    "ms_per_step",
    "ms_per_step_vs_V0",
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
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary["runs"])
    (out / f"{SUMMARY}.csv").write_text(buf.getvalue())
    done = [r["dir"] for r in summary["runs"] if r["status"] == "done"]
    if done:  # loss against tokens and against wall time for every run, plus an HTML comparison
        write_report(done, out / REPORT_DIR)
