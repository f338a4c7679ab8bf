"""What became of a job, read from its run folder alone (so every launcher is judged the same way)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 15
START_MARK = "--- job start:"  # the line each attempt writes first to the run's job.log


def start_line(where: str) -> bytes:
    """The log line that opens one attempt at a job (``where``: the pid, or the SLURM job)."""
    return f"{START_MARK} {where}\n".encode()


def stopped_by_signal(results: dict[str, Any]) -> bool:
    return str(results.get("stop_reason", "")).startswith("signal")


def finished(results_path: Path) -> bool:
    """Whether a run left results that it reached by its budget (a run stopped by a signal did not)."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return not stopped_by_signal(json.loads(results_path.read_text()))
    return False


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of the last attempt in a job's log (progress-bar redraws
    split off)."""
    with contextlib.suppress(OSError):
        text = log_path.read_bytes()[-64 * 1024 :].decode(errors="replace").replace("\r", "\n")
        kept = [line for line in text.splitlines() if line.strip()]
        starts = [i for i, line in enumerate(kept) if line.startswith(START_MARK)]
        return kept[starts[-1] + 1 if starts else 0 :][-lines:]
    return []


def outcome(results_path: Path, log_path: Path) -> dict[str, Any]:
    """``{"status": done | interrupted | failed}``, with the error and the log's tail when it failed."""
    if finished(results_path):
        return {"status": "done"}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        results = json.loads(results_path.read_text())
        if stopped_by_signal(results):
            return {"status": "interrupted", "stop_reason": results["stop_reason"]}
    tail = log_tail(log_path)
    stopped = [line for line in tail if line.startswith("stopped by ")]
    if stopped:  # stopped before training started (or while preparing data): nothing lost
        return {"status": "interrupted", "stop_reason": stopped[-1]}
    error = tail[-1] if tail else f"no results and no log ({log_path} is empty)"
    return {"status": "failed", "error": error, "log_tail": tail}
