"""Fault injection at named points, for the tests that prove a run survives signals and dead ranks.

Set ``GPT2_FAULT`` to ``point=NAME,at=N,do=ACTION[,after=SECONDS][,rank=R][,restart=K][,job=J]``: the
N-th time (from 1) this process passes :func:`point` ``NAME``, it does ACTION: ``sigterm``,
``sigint``, ``sigkill`` (to itself) or ``raise`` (a RuntimeError). ``after`` delays a signal by
that many seconds on a timer thread, so it lands inside whatever runs then (a matmul, a file
write). ``rank`` and ``restart`` restrict it to one torchrun rank and one restart generation
(``TORCHELASTIC_RESTART_COUNT``); ``job`` to one run of an ablation (``GPT2_JOB``, which the
local launcher sets to the run's place in the plan, from 1; the coordinator itself has none).
Unset, :func:`point` costs one dictionary lookup.

Points: ``startup``, ``data`` (each chunk of a data preparation), ``eval_batch``,
``micro_step``, ``optimizer_step``, ``step_end``, ``checkpoint_write`` (between writing the
temporary file and renaming it), ``sample``, ``arm`` (the coordinator, before it starts each run).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

ENV = "GPT2_FAULT"
ACTIONS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL, "raise": None}


@dataclass(frozen=True)
class Fault:
    point: str
    at: int
    do: str
    after: float = 0.0
    rank: int | None = None
    restart: int | None = None
    job: int | None = None

    @classmethod
    def parse(cls, text: str) -> Fault:
        try:
            kv = dict(item.split("=", 1) for item in text.split(","))
            fault = cls(
                point=kv.pop("point"),
                at=int(kv.pop("at", "1")),
                do=kv.pop("do"),
                after=float(kv.pop("after", "0")),
                rank=int(kv["rank"]) if "rank" in kv else None,
                restart=int(kv["restart"]) if "restart" in kv else None,
                job=int(kv["job"]) if "job" in kv else None,
            )
            kv.pop("rank", None), kv.pop("restart", None), kv.pop("job", None)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{ENV}={text!r}: expected point=NAME,at=N,do=ACTION ({e})") from None
        if kv or fault.do not in ACTIONS:
            raise ValueError(f"{ENV}={text!r}: unknown keys {sorted(kv)} or action {fault.do!r}")
        return fault

    def applies_here(self) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        job = int(os.environ.get("GPT2_JOB", "0"))
        return (
            (self.rank is None or self.rank == rank)
            and (self.restart is None or self.restart == restart)
            and (self.job is None or self.job == job)
        )


_fault = Fault.parse(os.environ[ENV]) if os.environ.get(ENV) else None
_hits: dict[str, int] = {}


def point(name: str) -> None:
    """Pass fault point ``name``: fires the configured fault on its ``at``-th pass, else nothing."""
    if _fault is None or _fault.point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != _fault.at or not _fault.applies_here():
        return
    if _fault.do == "raise":
        raise RuntimeError(f"injected fault at {name} #{_fault.at}")
    if _fault.after > 0:
        timer = threading.Timer(_fault.after, _fire, (name,))
        timer.daemon = True
        timer.start()
    else:
        _fire(name)


def _fire(name: str) -> None:
    """Send the signal, saying when (``time.monotonic`` is one clock for every process of a machine)."""
    assert _fault is not None
    at = f"{name} #{_fault.at}"
    sys.stderr.write(f"fault injected: {_fault.do} at {at}, monotonic {time.monotonic():.3f}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), ACTIONS[_fault.do])
