"""Where a case ran: the device, the CPU's model and vector extensions, torch; and how to wait for
the device, so that a timer stops when the work is done, not when it was queued."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

ISA_FLAG = {"avx2": "avx2", "avx512": "avx512f"}  # the /proc/cpuinfo flag each --isa needs


def synchronizer(device: Any) -> Callable[[], Any]:
    """A function that waits for ``device`` (a ``torch.device``) to finish its queued work."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def machine_fields(device: Any) -> dict[str, Any]:
    """What every case's row records of where it ran."""
    import torch

    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def cpu_info() -> tuple[str, set[str]] | None:
    """The CPU's model name and flags from /proc/cpuinfo (None where there is none)."""
    name, flags = "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "cpu":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return None
    return name, flags


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter here (AVX2, AVX-512, AMX)."""
    info = cpu_info()
    if info is None:
        import platform

        return platform.processor() or "cpu"
    name, flags = info
    have = [tag for f, tag in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")) if f in flags]
    return f"{name} [{', '.join(have) or 'no AVX2'}]"
