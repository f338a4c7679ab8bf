"""This machine's GEMM ceiling: the matmul rate each case's achieved FLOP rate is a fraction of.
Measured in a worker process of its own (``--worker gemm``), like a case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpt2.bench.machine import synchronizer

REPEATS = 5  # the best of this many products


def measure_gemm(device_name: str) -> dict[str, Any]:
    """The best of a few (n x n) @ (n x n) products, in GFLOP/s, for fp32 and, where bf16 is
    native (CUDA, AMX), bf16. Threads as the training cases use them."""
    import time

    import torch

    from gpt2.runtime import configure_process, cpu_has_native_bf16, resolve_device

    configure_process()
    device = resolve_device(device_name)
    n = 8192 if device.type == "cuda" else 2048
    sync = synchronizer(device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" or cpu_has_native_bf16() else [])
    out: dict[str, Any] = {"case": "gemm", "n": n, "device": str(device)}
    for dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        best = float("inf")
        for _ in range(REPEATS):
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
        out[str(dt).replace("torch.", "")] = 2 * n**3 / best / 1e9
    return out


def gemm_ceiling(root: Path, device: str, timeout: float) -> dict[str, Any] | None:
    """:func:`measure_gemm`'s figures from its own process (run in ``root``, the repository), or
    None if it could not run within ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "gpt2.bench", "--worker", "gemm", "--device", device]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
