"""Runs the cases: each in a fresh worker process, within the time limits, in interleaved rounds;
the report is rewritten after every case, and the GEMM ceiling measured last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpt2.bench.gemm import gemm_ceiling
from gpt2.bench.report import write

ROOT = Path(__file__).resolve().parents[2]  # the repository: workers run ``-m gpt2.bench`` from it
GEMM_TIMEOUT_S = 120.0


def run_cases(
    cases: list[str],
    worker_args: list[str],
    out: Path,
    preset: str,
    settings: dict[str, Any],
    rounds: int,
    case_timeout: float | None,
    time_budget: float | None,
) -> None:
    """Every case in its own worker process, ``rounds`` times interleaved (A B A B, so a drift in
    the machine hits every case); the table is rewritten after each, so a run cut off keeps its rows.

    ``case_timeout``: seconds one case may take; ``time_budget``: seconds for the whole call (a case
    gets at most what is left; the cases left when it is spent get rows saying so).
    """
    start = time.monotonic()

    def left() -> float | None:
        return None if time_budget is None else time_budget - (time.monotonic() - start)

    runs: list[list[dict[str, Any]]] = [[] for _ in cases]  # per position in --cases, one per round
    for _ in range(rounds):
        for case, case_runs in zip(cases, runs, strict=True):
            remaining = left()
            if remaining is not None and remaining <= 0:
                case_runs.append({"case": case, "skipped": f"not run: --time-budget {time_budget:g} s spent"})
            else:
                limit = min((t for t in (case_timeout, remaining) if t is not None), default=None)
                cmd = [sys.executable, "-m", "gpt2.bench", "--worker", case, *worker_args]
                case_runs.append(run_case(case, cmd, ROOT, limit))
            row = case_runs[-1]
            print(f"{case}: {row.get('ms_per_step', row.get('skipped'))}", file=sys.stderr, flush=True)
            write(out, preset, [median_round(r) for r in runs if r], settings)
    remaining = left()
    if remaining is None or remaining > 0:  # the machine's GEMM ceiling, last (it takes a few seconds)
        device = worker_args[worker_args.index("--device") + 1]
        settings["gemm"] = gemm_ceiling(ROOT, device, min(GEMM_TIMEOUT_S, remaining or GEMM_TIMEOUT_S))
        write(out, preset, [median_round(r) for r in runs if r], settings)


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's row from its rounds: the round with the median step time (the lower of two
    middles), with every round's step time in ``round_ms``; the last row if none measured."""
    measured = sorted((r for r in runs if "ms_per_step" in r), key=lambda r: r["ms_per_step"])
    if not measured:
        return runs[-1]
    row = dict(measured[(len(measured) - 1) // 2])
    if len(runs) > 1:
        row["round_ms"] = [r.get("ms_per_step") for r in runs]
    return row


def run_case(case: str, cmd: list[str], root: Path, timeout: float | None) -> dict[str, Any]:
    """One case's worker process (in its own process group, so a timeout also ends the compiler
    processes it started); its JSON row, or a row saying why there is none."""
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"case": case, "skipped": f"timed out after {timeout:g} s"}
    except BaseException:  # interrupted or terminated: the worker must not go on holding the device
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        return {"case": case, "skipped": f"failed: {stderr.strip().splitlines()[-1:]}"}
    return json.loads(stdout.strip().splitlines()[-1])
