"""The summary of an ablation: per-run rows from the run folders, per-arm aggregates against the control
(paired by seed), equal-budget comparisons, and the files a reader opens (markdown, CSV, LaTeX, JSON,
and the HTML report of :mod:`gpt2.track.report`). Knows nothing of how the runs were launched."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt2.analysis import stats
from gpt2.config import RunConfig
from gpt2.track.metrics import read_metrics, write_json_atomic
from gpt2.track.report import interp, write_report

SUMMARY = "ablation_summary"
REPORT_DIR = "report"  # gpt2.track.report's PNGs (loss vs tokens / vs wall time, ...) and report.html


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
        row["log_tail"] = run.get("log_tail", [])
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
        threads=r.get("threads"),
        n_params=r["n_params"],
        stop_reason=r["stop_reason"],
        final_sparsity=r.get("final_sparsity"),
        results={k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)},
    )
    # the comparison batches' curves where there are (the same steps in every run), else the evaluations'
    compare = [m for m in metrics if "compare_val_loss" in m]
    points, prefix = (
        (compare, "compare_") if len(compare) > 1 else ([m for m in metrics if "val_loss" in m], "")
    )
    row["curve_of"] = "comparison" if prefix else "evaluation"
    row["curves"] = {
        metric: [(m["tokens"], m["elapsed_s"], m[prefix + metric]) for m in points if prefix + metric in m]
        for metric in CURVE_METRICS
    }
    if "final_val_accuracy" in r:
        row["final_val_accuracy"] = r["final_val_accuracy"]
    return row


CURVE_METRICS = ("val_loss", "val_accuracy")  # compared at equal budgets where a run records them
HIGHER_IS_BETTER = ("accuracy", "acc", "acc_norm")  # metric name endings; every other metric: lower


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is the better result (accuracies), else a smaller one (losses)."""
    return metric.endswith(HIGHER_IS_BETTER) or "_accuracy_at_" in metric


def decide_metric(name: str) -> str:
    """``--decide-on``'s name as a summary column: ``accuracy`` is the val accuracy at equal tokens."""
    return {"accuracy": "val_accuracy_at_equal_tokens", "loss": DECIDE_DEFAULT}.get(name, name)


def interpolate(curve: list[tuple[float, float, float]], axis: int, at: float) -> float | None:
    """The value of an eval curve ``[(tokens, train seconds, value)]`` at ``at`` on ``axis`` (0 or 1),
    linearly between the evaluations around it; None outside the curve."""
    pts = sorted((p[axis], p[2]) for p in curve)
    return interp([x for x, _ in pts], [y for _, y in pts], at)


# A run whose last evaluation comes within this fraction after the equal-time budget (a
# time-budgeted run overshoots by at most one step) is scored by that evaluation at equal time.
EQUAL_TIME_SLACK = 0.02


def _equal_budgets(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The common token and training-time budget of the finished runs (the smallest run's), and
    each run's val loss there: arms compared at equal tokens and at equal training time."""
    done = [r for r in rows if r["status"] == "done" and r.get("curves", {}).get("val_loss")]
    if not done:
        return {"tokens": None, "train_time_s": None}
    budget: dict[str, Any] = {
        "tokens": min(max(p[0] for p in r["curves"]["val_loss"]) for r in done),
        "train_time_s": min(max(p[1] for p in r["curves"]["val_loss"]) for r in done),
        "curve_of": "comparison" if all(r.get("curve_of") == "comparison" for r in done) else "evaluation",
    }
    for r in done:
        for metric, curve in r["curves"].items():
            if not curve:
                continue
            r[f"{metric}_at_equal_tokens"] = interpolate(curve, 0, budget["tokens"])
            at_time = interpolate(curve, 1, budget["train_time_s"])
            if at_time is None:  # time-budgeted arms all end at the budget, give or take a step
                last = max(curve, key=lambda p: p[1])
                if last[1] <= budget["train_time_s"] * (1 + EQUAL_TIME_SLACK):
                    at_time = last[2]
            r[f"{metric}_at_equal_time"] = at_time
    return budget


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


DECIDE_DEFAULT = "val_loss_at_equal_tokens"


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    """A run's value of ``metric``: a summary column, else a number of its results.json."""
    value = row.get(metric)
    if value is None:
        value = row.get("results", {}).get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summarize(
    cfg: RunConfig,
    steps: list[str],
    seeds: list[int],
    runs: list[dict[str, Any]],
    control: str,
    launched: str = "",
    *,
    decide_on: str = DECIDE_DEFAULT,
    margin: float | None = None,
    sequential: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rows per run, aggregates per arm (mean ± std over seeds) and deltas against the control, paired
    by seed (same seed: same data order and, where shapes allow, the same initial weights).

    The verdict of each arm is on ``decide_on`` (lower is better for losses; the sign says which way
    it moved): at the 5% level with Holm's correction across arms, or by the sequential rule of
    :func:`.stats.sequential` when ``sequential`` (``max_seeds``, ``alpha``) is given. ``margin``:
    the smallest difference that matters (E), for "no difference larger than E"."""
    decide_on = decide_metric(decide_on)
    rows = [_run_row(r) for r in runs]
    equal = _equal_budgets(rows)
    done = {(r["step"], r["seed"]): r for r in rows if r["status"] == "done"}
    for r in rows:
        b = done.get((control, r["seed"]))
        if r["status"] == "done" and b is not None:
            r["delta_val_loss_vs_control"] = r["final_val_loss"] - b["final_val_loss"]
            r["ms_per_step_vs_control"] = r["ms_per_step"] / b["ms_per_step"]
            mine, theirs = metric_value(r, decide_on), metric_value(b, decide_on)
            if mine is not None and theirs is not None:
                r["delta_vs_control"] = mine - theirs
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
            "final_val_accuracy",
            "val_accuracy_at_equal_tokens",
            "val_accuracy_at_equal_time",
            "delta_val_loss_vs_control",
            "delta_vs_control",
        ):
            agg[key], agg[f"{key}_std"] = _mean_std([r[key] for r in mine if r.get(key) is not None])
        agg["decide_value"], agg["decide_value_std"] = _mean_std(
            [v for v in (metric_value(r, decide_on) for r in mine) if v is not None]
        )
        agg["n_params"] = mine[0]["n_params"] if mine else None
        ratios = [r["ms_per_step_vs_control"] for r in mine if "ms_per_step_vs_control" in r]
        agg["ms_per_step_vs_control"] = statistics.fmean(ratios) if ratios else None
        per_step.append(agg)
    deltas = {
        a["step"]: [r["delta_vs_control"] for r in rows if r["step"] == a["step"] and "delta_vs_control" in r]
        for a in per_step
        if a["step"] != control
    }
    if sequential:
        found = stats.sequential(deltas, sequential["max_seeds"], sequential["alpha"], margin)
        sequential = {**sequential, "seeds_run": len(seeds), "decided": stats.decided(found)}
    else:
        found = stats.decide(deltas, stats.ALPHA, margin)
    verdicts = {a: asdict(v) for a, v in found.items()}
    for agg in per_step:
        _verdict_columns(agg, verdicts.get(agg["step"]), deltas.get(agg["step"], []))
    return {
        "steps": steps,
        "seeds": seeds,
        "control": control,
        "decide_on": decide_on,
        "higher_is_better": higher_is_better(decide_on),
        "min_effect": margin,
        "method": stats.METHOD if sequential else "paired t-tests at 5%, Holm-Bonferroni across arms",
        "sequential": sequential,
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
        "launched": launched,
    }


def _verdict_columns(agg: dict[str, Any], verdict: dict[str, Any] | None, deltas: list[float]) -> None:
    """An arm's Δ interval at 95% (descriptive, uncorrected), raw and Holm-adjusted p, the minimum
    detectable effect at 80% power for its seeds, and the verdict."""
    agg["delta_ci95"] = agg["p_value"] = agg["p_holm"] = agg["mde80"] = agg["verdict"] = None
    agg["beyond_seed_noise"] = agg["ruled_out"] = None
    if verdict is None:
        return
    fixed = stats.paired(deltas) if len(deltas) > 1 else None
    agg["delta_ci95"] = list(fixed.ci) if fixed and fixed.ci else None
    agg["mde80"] = fixed.mde if fixed else None
    agg["p_value"] = verdict["paired"]["p"]
    agg["p_holm"] = verdict["p_adjusted"]
    agg["verdict"] = verdict["decision"]
    agg["ruled_out"] = verdict["ruled_out"]
    if verdict["decision"] != "no test":
        agg["beyond_seed_noise"] = verdict["decision"] == "difference"


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
        f"tokens and {equal['train_time_s']:.1f} s of training, each value interpolated between "
        + (
            "its comparison evaluations (the same validation batches at steps 16, 23, 32, 45, ... and at "
            "the end of every run, outside the training time and the evaluation budget)"
            if equal.get("curve_of") == "comparison"
            else "evaluations"
        )
        + f" (at equal time, a final point up to {EQUAL_TIME_SLACK:.0%} later counts as at the budget)."
    )


def summary_latex(s: dict[str, Any]) -> str:
    """The summary as a booktabs table for a paper: arm, the verdict's metric, Δ with its 95% interval,
    the Holm-adjusted p-value, final val loss."""
    control = s["control"]
    sparsity = any(a.get("final_sparsity") is not None for a in s["by_step"])
    esc = lambda t: str(t).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
    pm = lambda text: text.replace("±", "$\\pm$")
    cols = "lrrrrr" + ("r" if sparsity else "")
    head = [
        "Arm",
        esc(s.get("decide_on", DECIDE_DEFAULT)).replace("\\_", " "),
        f"$\\Delta$ vs {esc(control)}",
        "95\\% CI",
        "$p$ (Holm)",
        "Final val loss",
    ] + (["Sparsity"] if sparsity else [])
    lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(head) + r" \\", "\\midrule"]
    for a in s["by_step"]:
        ci = a.get("delta_ci95")
        cells = [
            esc(a["step"]),
            pm(_fmt(a["decide_value"], a["decide_value_std"])),
            "--" if a["step"] == control else pm(_fmt(a["delta_vs_control"], a["delta_vs_control_std"])),
            "--" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
            "--" if a.get("p_holm") is None else _p(a["p_holm"]).replace("<", "$<$"),
            pm(_fmt(a["final_val_loss"], a["final_val_loss_std"])),
        ] + ([_fmt(a.get("final_sparsity"), digits=3)] if sparsity else [])
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def _p(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2g}" if v >= 1e-4 else "<1e-4"


def _verdict_text(a: dict[str, Any], higher_better: bool = False) -> str:
    verdict = a.get("verdict")
    if verdict in (None, "no test"):
        return "-"
    if verdict == "difference":
        delta = a.get("delta_vs_control") or 0
        return "better" if (delta > 0 if higher_better else delta < 0) else "worse"
    if verdict == "undecided" and a.get("ruled_out") is not None:
        return f"undecided (rules out > {a['ruled_out']:.3f})"
    return verdict


def _method_text(s: dict[str, Any]) -> str:
    """What the verdict column means, for the caption."""
    metric, control, m = s.get("decide_on", DECIDE_DEFAULT), s["control"], len(s["by_step"]) - 1
    text = (
        f"The verdict is on {metric} (Δ = arm − {control} with the same seed; "
        f"{'higher' if s.get('higher_is_better') else 'lower'} is better): p from paired t-tests over "
        f"seeds (scipy.stats), Holm-Bonferroni adjusted across the {m} "
        "arm(s); 'better'/'worse': adjusted p within the level"
    )
    if s.get("min_effect") is not None:
        e = s["min_effect"]
        text += f"; 'no difference > {e:g}': the two one-sided tests reject |Δ| ≥ {e:g}"
    seq = s.get("sequential")
    if seq:
        text += (
            f". Seeds ran in rounds until every arm was decided or {seq['max_seeds']} seeds were spent "
            f"({seq['seeds_run']} run; {s['method']}; overall level {seq['alpha']:g}, each look's level "
            "what the spending function adds there, so repeated looks do not inflate the error rate)"
        )
    else:
        text += ", at 5%"
    return (
        text + ". 'rules out > x': the effect sizes the data exclude at that level. The 95% interval of Δ "
        "is descriptive (uncorrected); MDE: the smallest |Δ| a paired t-test at 5% finds with 80% "
        "power after this many seeds."
    )


def summary_markdown(s: dict[str, Any]) -> str:
    """The answer first: one row per arm, against the control, then what the columns mean."""
    b, control = s["budget"], s["control"]
    metric = s.get("decide_on", DECIDE_DEFAULT)
    several = len(s["seeds"]) > 1
    sparsity = any(a.get("final_sparsity") is not None for a in s["by_step"])
    accuracy = any(a.get("final_val_accuracy") is not None for a in s["by_step"])
    acc_cols = ("final_val_accuracy", "val_accuracy_at_equal_tokens") if accuracy else ()
    lines = [
        f"# Ablation summary ({s['model_name']}, dataset {s['dataset']})",
        "",
        f"| arm | {metric} | Δ vs {control} | 95% CI of Δ | p | p (Holm) | MDE (80%) | verdict | "
        "final val loss | val loss @ equal tokens | @ equal train time | "
        + ("final val accuracy | accuracy @ equal tokens | " if accuracy else "")
        + ("sparsity | " if sparsity else "")
        + f"ms/step | vs {control} | tokens/s | tokens seen | train s | peak MiB | params | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|"
        + "---|" * len(acc_cols)
        + ("---|" if sparsity else "")
        + "---|---|---|---|---|---|---|---|",
    ]
    higher = s.get("higher_is_better", False)
    for a in s["by_step"]:
        lines.append(
            f"| {a['step']} | {_fmt(a['decide_value'], a['decide_value_std'])} | "
            f"{_fmt(a['delta_vs_control'], a['delta_vs_control_std'])} | {_ci(a)} | {_p(a['p_value'])} | "
            f"{_p(a['p_holm'])} | {_fmt(a['mde80'])} | {_verdict_text(a, higher)} | "
            f"{_fmt(a['final_val_loss'], a['final_val_loss_std'])} | "
            f"{_fmt(a.get('val_loss_at_equal_tokens'), a.get('val_loss_at_equal_tokens_std'))} | "
            f"{_fmt(a.get('val_loss_at_equal_time'), a.get('val_loss_at_equal_time_std'))} | "
            + "".join(f"{_fmt(a.get(k), a.get(f'{k}_std'))} | " for k in acc_cols)
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
        + f", {b['tokens_per_step']:,} tokens/step. Values are mean ± std over seeds. "
        + (_method_text(s) if several else "With one seed there is no noise estimate (use --ablation-seeds).")
        + _equal_text(s.get("equal_budget") or {})
        + " ms/step is the median over log windows (evaluation excluded); tokens/s follows from it. "
        "Every run is its own process: peak memory is the run's own (CUDA: allocated; CPU: peak RSS)."
        + (f" Launched: {s['launched']}." if s.get("launched") else ""),
        "",
        "Arms: " + "; ".join(f"{a['step']}: {a['description']}" for a in s["by_step"]) + ".",
    ]
    problems = [r for r in s["runs"] if r["status"] != "done"]
    if problems:
        lines += ["", "Runs that did not finish:"]
        for r in problems:
            error = f" ({r['error']})" if r.get("error") else ""
            lines.append(f"- {r['step']} seed {r['seed']}: {r['status']}{error}")
            if r.get("log_tail"):  # the end of its log, where the reason is
                lines += ["", "  ```", *(f"  {line}" for line in r["log_tail"]), "  ```"]
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
    "delta_vs_control",
    "iters",
    "tokens_seen",
    "train_time_s",
    "wall_time_s",
    "ms_per_step",
    "ms_per_step_vs_control",
    "final_sparsity",
    "val_loss_at_equal_tokens",
    "val_loss_at_equal_time",
    "final_val_accuracy",
    "val_accuracy_at_equal_tokens",
    "val_accuracy_at_equal_time",
    "tokens_per_s",
    "peak_memory_mib",
    "threads",
    "n_params",
    "stop_reason",
    "error",
    "dir",
    "description",
)


def write_summary(out: Path, summary: dict[str, Any], quiet: bool = False) -> None:
    """ablation_summary.json/.md/.csv in ``out``; plots and report.html in ``out/report`` (``quiet``:
    without printing the report's table, as for a partial summary)."""
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
        write_report(done, out / REPORT_DIR, answer=summary_markdown(summary), arms=arms, quiet=quiet)
