"""The benchmark script runs its cases in subprocesses and writes a table with one row per case."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pytest
import torch

from gpt2 import bench
from gpt2.bench import cases, cli, report, runner, workers
from tests.conftest import REPO


def test_set_values_parse_as_json_or_string() -> None:
    assert cli.parse_value("3") == 3
    assert cli.parse_value("true") is True
    assert cli.parse_value("") is True
    assert cli.parse_value("bfloat16") == "bfloat16"


def test_bench_writes_one_row_per_case_with_its_dtype_and_profiles(tmp_path) -> None:
    cmd = [
        sys.executable, "-m", "gpt2.bench", "--preset", "tiny", "--cases", "vanilla,vanilla:bfloat16",
        "--steps", "2", "--warmup", "1", "--set", "n_layer=1", "--set", "block_size=16",
        "--set", "batch_size=2", "--device", "cpu", "--out", str(tmp_path), "--profile",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["vanilla", "vanilla:bfloat16"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_step"] == 32 and r["final_loss"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| vanilla:bfloat16 | bfloat16 |" in md
    assert "- nanoGPT (2 AMD EPYC cores, fp32): 308.0 ms/step" in md  # published elsewhere, labelled
    for name in ("vanilla", "vanilla-bfloat16"):  # --profile: operator tables and traces
        assert "aten::mm" in (tmp_path / f"profile_{name}.txt").read_text()
        assert json.loads(gzip.decompress((tmp_path / f"trace_{name}.json.gz").read_bytes()))["traceEvents"]


def test_a_case_past_its_time_limit_is_reported_and_the_table_still_written(tmp_path) -> None:
    out = tmp_path / "out"
    code = bench.main(["--preset", "tiny", "--cases", "vanilla", "--case-timeout", "0.01", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert rows == [{"case": "vanilla", "skipped": "timed out after 0.01 s"}]
    assert "| vanilla | | skipped: timed out after 0.01 s |" in (out / "bench.md").read_text()


def test_case_groups_name_known_cases() -> None:
    assert set(bench.CORE) <= set(bench.CASES)
    assert set(bench.ANCHORS) == set(bench.PRESETS)


def test_every_case_is_one_row_with_a_known_measurement() -> None:
    assert all(name == case.name for name, case in bench.CASES.items())
    assert {case.measure for case in bench.CASES.values()} <= set(workers.MEASURES)
    with pytest.raises(ValueError, match="named twice"):
        cases._by_name(cases.Case("a", "one"), cases.Case("a", "again"))


@pytest.mark.parametrize("case", ["nope", "vanilla:float8", ","])
def test_unknown_case_is_a_usage_error(case, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["--cases", case])
    assert e.value.code == 2
    assert "unknown case" in capsys.readouterr().err


def test_a_case_this_machine_cannot_run_is_a_row_saying_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("cuDNN attention runs here")
    row = workers.run_worker("tiny", "vanilla-cudnn", steps=1, warmup=0, device="cpu", extra={})
    assert row == {
        "case": "vanilla-cudnn",
        "skipped": "--sdpa-backend cudnn needs CUDA; on cpu use auto, flash or math",
    }


def test_the_workloads_are_nanogpts_configuration() -> None:
    """The anchors ran nanoGPT with its own defaults (no biases, no dropout); so do our rows."""
    from gpt2.config import resolve

    for preset in bench.PRESETS:
        cfg = resolve({**bench.PRESETS[preset], **bench.CASES["vanilla"].overrides})
        assert (cfg.model.bias, cfg.model.dropout) == (False, 0.0), preset
        ref = resolve({**bench.PRESETS[preset], **bench.CASES["vanilla-ref"].overrides})
        assert (ref.model.bias, ref.model.dropout) == (True, 0.1), preset


def test_rounds_interleave_the_cases_and_report_the_median_round(tmp_path, monkeypatch) -> None:
    order, times = [], {"vanilla": iter([30.0, 10.0, 20.0]), "V1": iter([5.0, None, 7.0])}

    def fake_run(case, cmd, root, timeout):
        order.append(case)
        ms = next(times[case])
        if ms is None:
            return {"case": case, "skipped": "timed out after 1 s"}
        fields = dict(tokens_per_s=1.0, peak_memory_bytes=0, warmup_s=0.0, optimizer_ms=0.0)
        return {"case": case, "dtype": "float32", "ms_per_step": ms, "tag": ms, **fields,
                "optimizer_state_bytes_per_param": 8.0}  # fmt: skip

    monkeypatch.setattr(runner, "run_case", fake_run)
    assert (
        bench.main(["--preset", "tiny", "--cases", "vanilla,V1", "--rounds", "3", "--out", str(tmp_path)])
        == 0
    )
    assert order == ["vanilla", "V1"] * 3
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["case"], r["tag"], r["round_ms"]) for r in rows] == [
        ("vanilla", 20.0, [30.0, 10.0, 20.0]),
        ("V1", 5.0, [5.0, None, 7.0]),  # of two measured rounds, the lower middle
    ]
    assert "| vanilla | float32 | 20.0 (10.0-30.0) |" in (tmp_path / "bench.md").read_text()


def test_rounds_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--cases", "vanilla", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_a_time_budget_bounds_each_case_and_skips_what_is_left(tmp_path, monkeypatch) -> None:
    limits = []

    def fake_run(case, cmd, root, timeout):
        limits.append(timeout)
        time.sleep(0.6)
        return {"case": case, "skipped": "failed: (fake)"}

    monkeypatch.setattr(runner, "run_case", fake_run)
    argv = ["--preset", "tiny", "--cases", "vanilla,V0,V1", "--time-budget", "1", "--case-timeout", "60"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    assert len(limits) == 2 and limits[0] <= 1.0 and limits[1] <= 0.4  # what was left of the budget
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows[2] == {"case": "V1", "skipped": "not run: --time-budget 1 s spent"}


def test_every_run_times_the_reference_and_measures_the_gemm_ceiling(tmp_path) -> None:
    """The baseline is timed in the same call, so "vs reference" is a ratio from one run."""
    cmd = [
        sys.executable,
        "-m",
        "gpt2.bench",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--set",
        "n_layer=1",
        "--set",
        "block_size=16",
        "--set",
        "batch_size=2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]  # fmt: skip  (the default cases: reference, vanilla)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["case"] for r in data["rows"]] == ["reference", "vanilla"]
    assert data["gemm"]["float32"] > 0
    ref, ours = data["rows"]
    assert ref["final_loss"] > 0 and ref["tokens_per_step"] == ours["tokens_per_step"] == 32
    md = (tmp_path / "bench.md").read_text()
    assert "GEMM ceiling here (2048x2048 matmul, best of 5): float32" in md
    row = next(line for line in md.splitlines() if line.startswith("| vanilla |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[6] == f"{ref['ms_per_step'] / ours['ms_per_step']:.3f}x"  # vs reference
    assert cells[8].endswith("%")  # of the GEMM ceiling


def test_the_generation_case_compares_the_kv_cache_with_recomputing(tmp_path) -> None:
    row = workers.run_worker("tiny", "generate", steps=1, warmup=0, device="cpu", extra={"n_layer": 1})
    assert row["cached"] > 0 and row["uncached"] > 0 and row["same_tokens"] is True
    assert row["new_tokens"] == bench.GENERATE_TOKENS == 200
    md = report.table("tiny", [row])
    assert "Generation, 200 new tokens from one" in md and "the same tokens: yes" in md
