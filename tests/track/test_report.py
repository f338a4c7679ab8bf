"""``python -m gpt2.report``: PNGs and an HTML comparison table from real run directories."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gpt2.config import resolve
from gpt2.track.report import fmt_count, fmt_params, main
from gpt2.trainer.run import train_once
from tests.conftest import tiny_run_flags

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = {"loss_vs_tokens.png", "loss_vs_time.png", "lr.png", "throughput.png", "sparsity.png"}


@pytest.fixture(scope="module")
def two_runs(corpus_dir: Path, data_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two tiny CPU runs (conftest's ``tiny_flags``, which is function-scoped): a plain one and a
    magnitude-pruned one with another learning rate."""
    root = tmp_path_factory.mktemp("runs")
    flags = tiny_run_flags(corpus_dir, data_dir)
    variants = {
        "plain": {},
        "pruned": dict(pruning_method="magnitude", pruning_warmup=2, pruning_frequency=2, target_sparsity=0.5,
                       learning_rate=1e-3),
    }  # fmt: skip
    for name, extra in variants.items():
        train_once(resolve({**flags, **extra, "output_dir": str(root / name)}))
    return {name: root / name for name in variants}


class TableParser(HTMLParser):
    """Cells of the ``<table id="runs">`` (header row first) and the ``<img>`` sources."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self._in_table = self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "runs":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][-1] += data


def parse_page(page: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{run name: {column: cell}}`` and the image sources of a report page."""
    p = TableParser()
    p.feed(page.read_text())
    header, *rows = p.rows
    return {r[0]: dict(zip(header, r)) for r in rows}, p.images


@pytest.fixture(scope="module")
def report(two_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main([str(two_runs["plain"]), str(two_runs["pruned"]), "--out", str(out)]) == 0
    return out


def results_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def test_report_draws_valid_pngs(report: Path):
    from matplotlib.image import imread

    assert {p.name for p in report.glob("*.png")} == PLOTS
    for name in PLOTS:
        data = (report / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        img = imread(report / name)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 400, (name, img.shape)
        assert img[..., :3].std() > 0.01, f"{name} is blank"


def test_html_table_holds_the_runs_numbers(report: Path, two_runs):
    rows, images = parse_page(report / "report.html")
    assert set(rows) == {"plain", "pruned"}
    for name, run_dir in two_runs.items():
        res, row = results_of(run_dir), rows[name]
        assert row["final val loss"] == f"{res['final_val_loss']:.4f} ± {res['final_val_loss_se']:.4f}"
        assert row["best val loss"] == f"{res['best_val_loss']:.4f}"
        assert row["val ppl"] == f"{res['final_val_perplexity']:.2f}"
        assert row["iters"] == "8"
        assert row["tokens seen"] == fmt_count(res["tokens_seen"]) == f"{8 * 4 * 32:,}"
        assert row["tokens/s"] == f"{res['tokens_per_s']:,.0f}"
        assert row["params"] == fmt_params(res["n_params"])
        assert row["stop"] == "max_iters"
    assert rows["pruned"]["final sparsity"] == f"{results_of(two_runs['pruned'])['final_sparsity']:.1%}"
    assert rows["plain"]["final sparsity"] == "–"
    assert "learning_rate=0.001" in rows["pruned"]["differs"]
    assert "pruning_method=magnitude" in rows["pruned"]["differs"]
    # the page carries its images: one per PNG, byte for byte
    inlined = {
        base64.b64decode(src.split(",", 1)[1]) for src in images if src.startswith("data:image/png;base64,")
    }
    assert inlined == {(report / name).read_bytes() for name in PLOTS}


def test_an_ablation_root_expands_into_its_step_folders(two_runs, tmp_path: Path, capsys):
    root = tmp_path / "ablation"
    shutil.copytree(two_runs["plain"], root / "V0")
    shutil.copytree(two_runs["pruned"], root / "V10")
    shutil.copytree(two_runs["plain"], root / "V2")
    (root / "ablation_summary.json").write_text("{}")
    assert main([str(root)]) == 0  # one directory: the report goes into it
    rows, _ = parse_page(root / "report" / "report.html")
    assert list(rows) == ["V0", "V2", "V10"]
    assert rows["V10"]["final val loss"].startswith(f"{results_of(two_runs['pruned'])['final_val_loss']:.4f}")
    assert re.search(r"^V10 ", capsys.readouterr().out, re.M), "the table is printed too"


def test_an_unfinished_run_is_reported_from_its_metrics(two_runs, tmp_path: Path):
    run = tmp_path / "killed"
    shutil.copytree(two_runs["plain"], run)
    (run / "results.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_lo')  # torn last line of a killed process
    assert main([str(run), "--out", str(tmp_path / "rep")]) == 0
    rows, _ = parse_page(tmp_path / "rep" / "report.html")
    records = [json.loads(ln) for ln in (two_runs["plain"] / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "val_loss" in r][-1]
    row = rows["killed"]
    assert row["final val loss"].startswith(f"{last_eval['val_loss']:.4f}")
    assert row["iters"] == "8" and row["stop"].startswith("unfinished")


def test_a_directory_without_metrics_is_one_line_and_exit_2(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "gpt2.report", str(empty)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: {empty}: no metrics.jsonl"), p.stderr
    assert not (empty / "report").exists()

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "metrics.jsonl").write_text("")
    assert main([str(blank)]) == 2
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "nothing to report" in err[0] and "no such directory" in err[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(report: Path, tmp_path: Path):
    """What a user sees: the self-contained page renders, images and all, with no network."""
    from matplotlib.image import imread

    shot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,1600", (report / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    img = imread(shot)
    assert img.shape[:2] == (1600, 1200)
    # the plots are drawn: well beyond the page's white and the table's greys
    assert img[..., :3].std() > 0.05
