"""Wall time of one step-budgeted ablation run sequentially and with --ablation-workers N, on this machine.

    .venv/bin/python scripts/bench_launcher.py [--workers 2] [--max-iters 60] [--out /tmp/bench-launcher]

Runs the same 4-arm x 2-seed tiny ablation three times, one after another, in one call: sequential
with every core per run, sequential under OMP_NUM_THREADS=1, and with N workers (cores split, one
thread each on a 2-core machine). Prints each wall time, the ratio, each run's median ms/step, and
whether every run's final weights equal the one-thread sequential run's bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ABLATE = [
    "--ablate",
    "optimizer=adamw,muon",
    "--ablate",
    "learning-rate=0.001,0.002",
    "--ablation-seeds",
    "2",
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def ablation(out: Path, max_iters: int, extra: list[str], env: dict[str, str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "gpt2/train.py", "--model-name", "tiny", "--max-iters", str(max_iters),
            "--eval-interval", str(max_iters), "--eval-samples", "8", "--sample-tokens", "0", "--quiet",
            "--save-checkpoint", "--output-dir", str(out), *ABLATE, *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=60)
    p.add_argument("--out", default="/tmp/bench-launcher")
    a = p.parse_args()
    out = Path(a.out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cases = {
        "sequential": ([], env),
        "sequential, OMP_NUM_THREADS=1": ([], dict(env, OMP_NUM_THREADS="1")),
        f"--ablation-workers {a.workers}": (["--ablation-workers", str(a.workers)], env),
    }
    walls, dirs = {}, {}
    for i, (name, (extra, e)) in enumerate(cases.items()):
        dirs[name] = out / f"case{i}"
        walls[name] = ablation(dirs[name], a.max_iters, extra, e)
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; 8 runs of {a.max_iters} steps")
    print(
        "| case | wall s | vs sequential | median ms/step per run | threads | weights = 1-thread sequential |"
    )
    print("|---|---|---|---|---|---|")
    base, ref = walls["sequential"], dirs["sequential, OMP_NUM_THREADS=1"]
    for name, d in dirs.items():
        summary = json.loads((d / "ablation_summary.json").read_text())
        runs = sorted(summary["runs"], key=lambda r: r["dir"])
        ms = ", ".join(f"{r['ms_per_step']:.0f}" for r in runs)
        same = all(
            all(
                torch.equal(x, y)
                for x, y in zip(_weights(Path(r["dir"])), _weights(ref / Path(r["dir"]).relative_to(d)))
            )
            for r in runs
        )
        threads = sorted({r["threads"] for r in runs})
        ratio = base / walls[name]
        print(f"| {name} | {walls[name]:.1f} | {ratio:.2f}x | {ms} | {threads} | {'yes' if same else 'no'} |")


def _weights(run: Path) -> list[torch.Tensor]:
    state = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    return [state[k] for k in sorted(state)]


if __name__ == "__main__":
    main()
