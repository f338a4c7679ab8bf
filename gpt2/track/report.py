"""Plots and an HTML comparison of finished (or interrupted) runs, from their local records only.

``python -m gpt2.report RUN_DIR [RUN_DIR...] [--out DIR]`` reads each run's ``metrics.jsonl``
and ``results.json`` (an ablation root expands into its step folders) and writes to ``--out``:
``loss_vs_tokens.png``, ``loss_vs_time.png``, ``lr.png``, ``throughput.png``, ``sparsity.png``
(pruned runs only) and ``report.html``, a self-contained page with the plots and a table.
"""

from __future__ import annotations

import argparse
import base64
import html
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.errors import UserError

METRICS = "metrics.jsonl"
RESULTS = "results.json"
HTML = "report.html"
# Settings that differ between runs without meaning a different experiment.
_IGNORED_SETTINGS = {
    "explicit", "output_dir", "json_output", "tracker_run_name", "tracker_project", "resume", "quiet",
}  # fmt: skip


class ReportError(UserError):
    """Nothing to report on: a path that holds no run. Exit status 2, like a bad flag."""

    exit_code = 2


@dataclass
class Run:
    """One run directory: its training-log records, its evaluation records and its results."""

    name: str
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # log steps (have "lr")
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluations (have "val_loss")
    compares: list[dict[str, Any]] = field(default_factory=list)  # comparison evaluations
    results: dict[str, Any] = field(default_factory=dict)  # results.json ({} while unfinished)

    def final(self, key: str) -> Any:
        """``results[key]``, else the figure derived from ``metrics.jsonl`` (an interrupted run)."""
        if self.results.get(key) is not None:
            return self.results[key]
        last_eval = self.evals[-1] if self.evals else {}
        last = max(self.train + self.evals, key=lambda r: r.get("step", 0), default={})
        vals = [r["val_loss"] for r in self.evals if r.get("val_loss") is not None]
        derived: dict[str, Callable[[], Any]] = {
            "final_val_loss": lambda: last_eval.get("val_loss"),
            "final_val_loss_se": lambda: last_eval.get("val_loss_se"),
            "final_val_perplexity": lambda: last_eval.get("val_perplexity"),
            "best_val_loss": lambda: min(vals) if vals else None,
            "iters": lambda: last.get("step"),
            "tokens_seen": lambda: last.get("tokens"),
            "wall_time_s": lambda: last.get("elapsed_s"),
            "tokens_per_s": lambda: (
                last["tokens"] / last["elapsed_s"] if last.get("elapsed_s") and last.get("tokens") else None
            ),
            "peak_memory_bytes": lambda: max(
                (r["peak_memory_bytes"] for r in self.train if r.get("peak_memory_bytes")), default=None
            ),
            "final_sparsity": lambda: last_eval.get("sparsity"),
            "final_val_accuracy": lambda: last_eval.get("val_accuracy"),
        }
        return derived[key]() if key in derived else None


# ----------------------------------------------------------------------------- reading
def _read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (killed process) is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _is_run(d: Path) -> bool:
    return (d / METRICS).is_file() or (d / RESULTS).is_file()


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories of ``paths``: a run directory itself, or the runs below an ablation root
    (``<root>/<step>`` or ``<root>/<step>/seed<N>``). Raises :class:`ReportError` for a path without any."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p}: no such directory")
        if _is_run(p):
            runs = [p]
        else:
            runs = sorted(
                {
                    f.parent
                    for depth in ("*", "*/*")
                    for name in (METRICS, RESULTS)
                    for f in p.glob(f"{depth}/{name}")
                },
                key=_natural_key,
            )
        if not runs:
            raise ReportError(
                f"{p}: no {METRICS} or {RESULTS} here or in its sub-folders; is it a run directory?"
            )
        found += [r for r in runs if r not in found]
    return found


def _natural_key(p: Path) -> list[Any]:
    """V2 before V10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _names(dirs: list[Path]) -> list[str]:
    """The shortest trailing path that tells each run from the others (``V1``, ``sweep/lr3e-4``)."""
    parts = [d.resolve().parts for d in dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run under ``paths`` with its records; raises :class:`ReportError` when one has none."""
    dirs = find_run_dirs(paths)
    runs = []
    for name, d in zip(_names(dirs), dirs):
        records = _read_records(d / METRICS) if (d / METRICS).is_file() else []
        results: dict[str, Any] = {}
        if (d / RESULTS).is_file():
            try:
                results = json.loads((d / RESULTS).read_text())
            except json.JSONDecodeError as e:
                raise ReportError(f"{d / RESULTS}: not valid JSON ({e})") from None
        if not records and not results:
            raise ReportError(f"{d}: {METRICS} is empty and there is no {RESULTS}; nothing to report")
        runs.append(
            Run(
                name=name,
                path=d,
                train=[r for r in records if "lr" in r],
                evals=[r for r in records if "val_loss" in r],
                compares=[r for r in records if "compare_val_loss" in r],
                results=results,
            )
        )
    return runs


# ----------------------------------------------------------------------------- table
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_settings(runs: list[Run]) -> list[str]:
    """Per run, the configuration values that are not the same in every run (``learning_rate=0.001``)."""
    configs = [_flat(r.results.get("config", {})) for r in runs]
    if len(runs) < 2 or not all(configs):
        return ["" for _ in runs]
    keys = sorted({k for c in configs for k in c})
    keys = [
        k
        for k in keys
        if k.rsplit(".", 1)[-1] not in _IGNORED_SETTINGS and len({json.dumps(c.get(k)) for c in configs}) > 1
    ]
    return [", ".join(f"{k.rsplit('.', 1)[-1]}={c.get(k)}" for k in keys) for c in configs]


def fmt_loss(v: Any) -> str:
    return f"{v:.4f}" if _num(v) else "–"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_count(v: Any) -> str:
    return f"{int(v):,}" if _num(v) else "–"


def fmt_params(v: Any) -> str:
    return f"{v / 1e6:.2f}M" if _num(v) else "–"


def fmt_bytes(v: Any) -> str:
    if not _num(v) or v <= 0:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= size:
            return f"{v / size:.2f} {unit}"
    return f"{int(v)} B"


def fmt_duration(s: Any) -> str:
    if not _num(s):
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: header and one row of formatted cells per run."""
    with_sparsity = any(r.final("final_sparsity") is not None for r in runs)
    with_accuracy = any(r.final("final_val_accuracy") is not None for r in runs)
    header = [
        "run", "final val loss", "best val loss", "val ppl", "iters", "tokens seen",
        "tokens/s", "wall time", "peak memory", "params",
    ]  # fmt: skip
    if with_accuracy:
        header.insert(2, "final val accuracy")
    if with_sparsity:
        header.append("final sparsity")
    header += ["stop", "differs"]
    rows = []
    for run, diff in zip(runs, differing_settings(runs)):
        se = run.final("final_val_loss_se")
        final = fmt_loss(run.final("final_val_loss"))
        if final != "–" and _num(se) and se > 0:
            final += f" ± {se:.4f}"
        ppl = run.final("final_val_perplexity")
        row = [
            run.name,
            final,
            fmt_loss(run.final("best_val_loss")),
            f"{ppl:.2f}" if _num(ppl) else "–",
            fmt_count(run.final("iters")),
            fmt_count(run.final("tokens_seen")),
            f"{run.final('tokens_per_s'):,.0f}" if _num(run.final("tokens_per_s")) else "–",
            fmt_duration(run.final("wall_time_s")),
            fmt_bytes(run.final("peak_memory_bytes")),
            fmt_params(run.final("n_params")),
        ]
        if with_accuracy:
            acc = run.final("final_val_accuracy")
            row.insert(2, f"{acc:.4f}" if _num(acc) else "–")
        if with_sparsity:
            s = run.final("final_sparsity")
            row.append(f"{s:.1%}" if _num(s) else "–")
        row += [str(run.results.get("stop_reason", "unfinished (no results.json)")), diff]
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ----------------------------------------------------------------------------- plots
def _figure(n_axes: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * n_axes, 4.0), layout="constrained")
    FigureCanvasAgg(fig)  # draw with Agg; no pyplot, no global backend state
    fig.subplots(1, n_axes, squeeze=False)
    return fig


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if _num(r.get(x)) and _num(r.get(y))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(
    runs: list[Run],
    path: Path,
    panels: list[tuple[str, str, str, str]],
) -> Path | None:
    """One PNG with a panel per ``(records, x, y, title)``; every run is one coloured line per panel.

    ``records`` is ``"train"``, ``"evals"`` or ``"compares"``. Returns None when no panel has any data.
    """
    if not any(_series(getattr(r, src), x, y)[0] for r in runs for src, x, y, _ in panels):
        return None
    fig = _figure(len(panels))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (src, x, y, title) in zip(fig.axes, panels):
        for run, color in zip(runs, colors):
            xs, ys = _series(getattr(run, src), x, y)
            if xs:
                ax.plot(xs, ys, color=color, label=run.name, marker="o" if src != "train" else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel({"tokens": "tokens", "elapsed_s": "training time (s)", "step": "step"}.get(x, x))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def draw_plots(runs: list[Run], out: Path) -> list[tuple[str, Path]]:
    """The report's PNGs under ``out``: ``[(caption, path)]`` for the plots that had data.

    The validation panels draw the comparison evaluations where a run has too few regular ones for a
    curve (a time-budgeted run whose evaluation budget left only the final one)."""
    few = any(len(r.evals) < 2 for r in runs) and all(len(r.compares) > 1 for r in runs)
    src, prefix, batches = ("compares", "compare_", " (comparison batches)") if few else ("evals", "", "")
    val = (src, f"{prefix}val_loss", f"validation loss{batches}")
    specs: list[tuple[str, str, list[tuple[str, str, str, str]]]] = [
        ("Loss against tokens", "loss_vs_tokens.png",
         [("train", "tokens", "train_loss", "train loss (training batches)"),
          (val[0], "tokens", val[1], val[2])]),
        ("Loss against training time", "loss_vs_time.png",
         [("train", "elapsed_s", "train_loss", "train loss (training batches)"),
          (val[0], "elapsed_s", val[1], val[2])]),
        ("Accuracy on the answer positions", "accuracy.png",
         [(src, "tokens", f"{prefix}val_accuracy", f"validation accuracy{batches} against tokens"),
          (src, "elapsed_s", f"{prefix}val_accuracy", f"validation accuracy{batches} vs training time")]),
        ("Learning rate", "lr.png", [("train", "step", "lr", "learning rate")]),
        ("Throughput", "throughput.png",
         [("train", "step", "tokens_per_s", "tokens/s (training, between log steps)")]),
        ("Sparsity", "sparsity.png",
         [("evals", "step", "sparsity", "weight sparsity (measured)"),
          ("evals", "step", "sparsity_scheduled", "scheduled sparsity")]),
    ]  # fmt: skip
    drawn = []
    for caption, name, panels in specs:
        p = _plot(runs, out / name, panels)
        if p is not None:
            drawn.append((caption, p))
    return drawn


# ----------------------------------------------------------------------------- html
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, td:last-child, th:first-child { text-align: left; }
tr.best td { font-weight: bold; }
img { max-width: 100%; margin: 0.5em 0 1.5em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(
    runs: list[Run],
    header: list[str],
    rows: list[list[str]],
    plots: list[tuple[str, Path]],
    answer: str | None = None,
) -> str:
    """The self-contained page (PNGs inlined as data URIs, so the file can be sent on its own)."""
    best = [r.final("best_val_loss") for r in runs]
    best_i = min((i for i, b in enumerate(best) if _num(b)), key=lambda i: best[i], default=None)
    esc = html.escape
    trs = []
    for i, row in enumerate(rows):
        cls = ' class="best"' if i == best_i and len(rows) > 1 else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    imgs = []
    for caption, path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        imgs.append(f'<h2>{esc(caption)}</h2>\n<img alt="{esc(caption)}" src="data:image/png;base64,{data}">')
    dirs = "".join(f"<li><code>{esc(r.name)}</code>: <code>{esc(str(r.path))}</code></li>" for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>GPT-2 runs: {esc(", ".join(r.name for r in runs))}</title>
<style>{_CSS}</style></head>
<body>
{answer_html(answer) + "<h2>Every run</h2>" if answer else "<h1>GPT-2 training report</h1>"}
<p>{len(runs)} run(s). Losses are mean cross-entropy (nats/token) on fixed evaluation windows, ± their
standard error; tokens/s is tokens seen over training wall time (evaluation and checkpoints excluded).
{"The run with the lowest best validation loss is in bold." if len(runs) > 1 else ""}</p>
<table id="runs">
<thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in header)}</tr></thead>
<tbody>
{chr(10).join(trs)}
</tbody>
</table>
{chr(10).join(imgs) if imgs else "<p>No plots (matplotlib is missing or the runs logged no steps).</p>"}
<h2>Run directories</h2>
<ul>{dirs}</ul>
</body>
</html>
"""


def interp(xs: Sequence[float], ys: Sequence[float], at: float) -> float | None:
    """``y`` at ``x = at`` on the polyline through ``(xs, ys)`` (``xs`` ascending); None outside it."""
    if len(xs) == 1:
        return ys[0] if xs[0] == at else None
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys)):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return None


def draw_arm_bands(arms: dict[str, list[Run]], out: Path, metric: str = "val_loss") -> list[tuple[str, Path]]:
    """Per arm, ``metric`` (``val_loss``, ``val_accuracy``) over seeds (mean line, min-max band) against
    tokens and training time: on the comparison batches where every run has such a curve (every
    budget then has points at the same steps), else from the regular evaluations."""
    runs = [r for rs in arms.values() for r in rs]
    compared = bool(runs) and all(len(r.compares) > 1 for r in runs)
    kind, key = ("compares", f"compare_{metric}") if compared else ("evals", metric)
    if not any(_series(getattr(r, kind), "tokens", key)[0] for r in runs):
        return []
    what = metric.replace("val_", "validation ")
    fig = _figure(2)
    for ax, x, label in zip(fig.axes, ("tokens", "elapsed_s"), ("tokens", "training time (s)")):
        for i, (name, rs) in enumerate(arms.items()):
            curves = [c for c in (_series(getattr(r, kind), x, key) for r in rs) if c[0]]
            if curves and all(len(c[0]) == 1 for c in curves):  # one evaluation each: a point, min-max bar
                xs, ys = [c[0][0] for c in curves], [c[1][0] for c in curves]
                mean = sum(ys) / len(ys)
                ax.errorbar(
                    [sum(xs) / len(xs)], [mean], yerr=[[mean - min(ys)], [max(ys) - mean]], fmt="o",
                    color=f"C{i % 10}", capsize=3, label=f"{name} ({len(curves)} seeds)",
                )  # fmt: skip
                continue
            curves = [c for c in curves if len(c[0]) > 1]
            if not curves:
                continue
            end = min(c[0][-1] for c in curves)  # the span every seed covers
            grid = [end * k / 50 for k in range(51)]
            cols = [[interp(xs, ys, g) for xs, ys in curves] for g in grid]
            keep = [(g, [v for v in c if v is not None]) for g, c in zip(grid, cols)]
            keep = [(g, c) for g, c in keep if c]
            gx = [g for g, _ in keep]
            ax.plot(
                gx,
                [sum(c) / len(c) for _, c in keep],
                color=f"C{i % 10}",
                label=f"{name} ({len(curves)} seeds)",
            )
            ax.fill_between(
                gx, [min(c) for _, c in keep], [max(c) for _, c in keep], color=f"C{i % 10}", alpha=0.2
            )
        where = " on the comparison batches" if compared else ""
        ax.set_title(f"{what}{where} per arm\n(mean, min-max over seeds)", fontsize="medium")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines() or ax.containers:
            ax.legend(fontsize="small")
    path = out / f"arms_{metric}.png"
    fig.savefig(path, dpi=100)
    return [(f"{what.capitalize()} per arm against tokens and training time", path)]


def answer_html(markdown: str) -> str:
    """The ablation summary's Markdown (a heading, one table, paragraphs) as HTML."""
    esc, out, table = html.escape, [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            ths = "".join(f"<th>{esc(c)}</th>" for c in head)
            trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append(f'<table id="answer"><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>')
            table = []
        if line.startswith("# "):
            out.append(f"<h1>{esc(line[2:])}</h1>")
        elif line.strip():
            out.append(f"<p>{esc(line)}</p>")
    return "\n".join(out)


def write_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    answer: str | None = None,
    arms: dict[str, list[str]] | None = None,
    quiet: bool = False,
) -> Path:
    """Read the runs under ``paths``; write the PNGs and ``report.html`` to ``out``; returns the page.

    ``answer``: an ablation summary (Markdown) that opens the page; ``arms``: arm -> its runs'
    directories, for the per-arm mean/min-max plots; ``quiet``: print nothing (a partial report).
    """
    runs = load_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(runs)
    try:
        plots = draw_plots(runs, out)
        if arms:
            by_dir = {r.path.resolve(): r for r in runs}
            grouped = {
                a: [by_dir[Path(d).resolve()] for d in ds if Path(d).resolve() in by_dir]
                for a, ds in arms.items()
            }
            plots = draw_arm_bands(grouped, out) + draw_arm_bands(grouped, out, "val_accuracy") + plots
    except ImportError:
        print(
            "warning: matplotlib is not installed; the report has no plots (pip install matplotlib)",
            file=sys.stderr,
        )
        plots = []
    page = out / HTML
    page.write_text(render_html(runs, header, rows, plots, answer=answer))
    if not quiet:
        print(text_table(header, rows))
        print(f"report: {page} ({len(plots)} plots)")
    return page


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gpt2.report",
        description="Loss, learning-rate, throughput and sparsity plots and an HTML comparison table of "
        "training runs (run directories, or ablation roots holding one folder per step).",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output directory of a run or an ablation")
    p.add_argument("--out", default=None,
                   help="where to write report.html and the PNGs (default: RUN_DIR/report for one "
                        "directory, ./report for several)")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or (str(Path(args.run_dirs[0]) / "report") if len(args.run_dirs) == 1 else "report")
    try:
        write_report(args.run_dirs, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
