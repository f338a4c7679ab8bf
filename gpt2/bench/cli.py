"""Training-step benchmark: ``python -m gpt2.bench [--preset tiny] [--cases vanilla,...]``.

Times the real training step (:class:`gpt2.trainer.step.TrainStep`, built by the real
:class:`~gpt2.trainer.loop.Trainer`) on random tokens, one fresh process per case so peak
memory and warm-up are measured cleanly, and reports each case as a ratio to the first and to
the ``reference`` case: what nanoGPT computes (the plain model, full logits, ``F.cross_entropy``,
foreach AdamW, glibc's default allocator), timed in the same call on the same machine. So every
ratio comes from one run; figures published from other machines are shown, labelled, never
divided by. The call also measures this machine's GEMM ceiling (fp32, and bf16 where it is
native) and reports each case's achieved FLOP rate as a fraction of it.
Writes ``bench.json`` and ``bench.md`` to ``--out`` (default ``$OUT`` or ``./bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2.bench.cases import CASES, CORE, DEFAULT_STEPS, PRESETS
from gpt2.bench.gemm import measure_gemm
from gpt2.bench.machine import ISA_FLAG, cpu_info, cpu_model
from gpt2.bench.runner import run_cases
from gpt2.bench.workers import run_worker


def main(argv: list[str] | None = None) -> int:
    """The benchmark's command line; also each worker process's (``--worker CASE``, or ``gemm``)."""
    p = _parser()
    args = p.parse_args(argv)
    extra = {key.replace("-", "_"): parse_value(raw) for key, _, raw in (s.partition("=") for s in args.set)}
    preset = args.preset
    if preset == "auto":
        import torch

        preset = "gpt2-gpu" if torch.cuda.is_available() and args.device != "cpu" else "tiny"
    compiled = bool(PRESETS[preset].get("compile") or extra.get("compile"))
    steps = args.steps or DEFAULT_STEPS[preset]
    warmup = args.warmup if args.warmup is not None else (10 if compiled else 3)
    out = Path(args.out)
    if args.worker == "gemm":
        print(json.dumps(measure_gemm(args.device)))
        return 0
    if args.worker:  # one case, in this process: its row on stdout
        profile = out if args.profile else None
        print(json.dumps(run_worker(preset, args.worker, steps, warmup, args.device, extra, profile)))
        return 0
    cases = _cases(p, args.cases)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": steps, "warmup": warmup, "rounds": args.rounds, "extra": extra, "isa": args.isa}
    _limit_isa(p, args.isa)
    worker_args = ["--preset", preset, "--steps", str(steps), "--warmup", str(warmup),
                   "--device", args.device, "--out", str(out.resolve()),
                   *(["--profile"] if args.profile else []),
                   *[a for s in args.set for a in ("--set", s)]]  # fmt: skip
    with _sigterm_unwinds():
        run_cases(cases, worker_args, out, preset, settings, args.rounds, args.case_timeout, args.time_budget)
    print((out / "bench.md").read_text(), end="")
    return 0


def parse_value(raw: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true, lists), else the bare string."""
    if raw == "":
        return True
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _cases(p: argparse.ArgumentParser, arg: str) -> list[str]:
    """``--cases``: a group (``all``, ``core``) or a comma list of NAME or NAME:DTYPE; unknown: exit 2."""
    from gpt2.config import DTYPES

    groups = {"all": list(CASES), "core": list(CORE)}
    cases = groups.get(arg) or [c.strip() for c in arg.split(",") if c.strip()]
    unknown = [
        c for c in cases if c.partition(":")[0] not in CASES or c.partition(":")[2] not in ("", *DTYPES)
    ]
    if unknown or not cases:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return cases


def _limit_isa(p: argparse.ArgumentParser, isa: str) -> None:
    """``--isa``: limit torch's CPU kernels in every worker (they inherit the environment)."""
    if isa == "native":
        return
    from gpt2.runtime import CPU_ISA_ENV

    info = cpu_info()
    if info is not None and ISA_FLAG[isa] not in info[1]:
        p.error(f"--isa {isa}: this CPU has no {isa.upper()} ({cpu_model()})")
    os.environ.update(CPU_ISA_ENV[isa])  # inherited by every worker process


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (an outer `timeout`, a scheduler) unwinds like Ctrl-C, so the running worker is killed."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        choices=[*PRESETS, "auto"],
        default="auto",
        help="workload; auto = gpt2-gpu on CUDA, tiny on CPU",
    )
    p.add_argument(
        "--cases",
        default="reference,vanilla",
        help=f"comma list of {', '.join(CASES)}; 'all', or 'core' ({', '.join(CORE)}); CASE:DTYPE "
        "(e.g. vanilla:bfloat16) overrides the preset's dtype for that case",
    )
    p.add_argument(
        "--case-timeout",
        type=float,
        default=None,
        help="seconds one case may take (its row then says so and the next case runs); default none",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole call: a case gets at most what is left, and cases left when it is "
        "spent get rows saying so (for a machine lent for a fixed time); default none",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20 on CPU tiny, 5 gpt2-cpu, 50 GPU)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 3; 10 with compile)"
    )
    _add_run_settings(p)
    return p


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    """The flags after the workload's: rounds, device, overrides, output, profiling, ISA, worker."""
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the case list this many times, interleaved (A B A B): each row is its median "
        "round, with the spread (use on noisy machines; CPU cases spread by up to 10%%)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every case, e.g. --set compile=true",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "bench"), help="folder for bench.json and bench.md")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile 3 steps of each case: profile_<case>.txt (operators by self time) and "
        "trace_<case>.json.gz (chrome://tracing, Perfetto) in --out",
    )
    p.add_argument(
        "--isa",
        choices=["native", "avx2", "avx512"],
        default="native",
        help="CPU: limit torch's kernels (ATen, oneDNN, MKL) to this instruction set in every case, "
        "to measure a CPU without AVX-512 (avx2) or without AMX (avx512) on this one",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
