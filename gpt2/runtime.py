"""Process-level setup shared by every entry point: allocator, threads, device, precision."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import time
from pathlib import Path
from typing import Any

import torch

from gpt2.errors import ConfigError

_configured = False


def cpu_threads(requested: int = 0) -> int:
    """The CPU threads a run uses: ``requested`` (``--threads``), else ``OMP_NUM_THREADS`` when set,
    else every core this process may run on (its affinity, which a launcher may have narrowed)."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


def configure_process(threads: int = 0) -> None:
    """Tune this process: glibc keeps freed memory (once), torch uses :func:`cpu_threads` threads.

    On CPU a GPT-2 step allocates and frees the 50k-wide logits and their gradient every
    step; by default glibc hands such blocks back to the kernel (mmap/munmap) and the next
    step page-faults them in again, which costs more than the arithmetic. Serving large
    blocks from the heap and never trimming it removes that cost; it has no effect on CUDA
    tensors.
    """
    global _configured
    with contextlib.suppress(AttributeError, RuntimeError):
        torch.set_num_threads(cpu_threads(threads))
    if _configured:
        return
    _configured = True
    libc_name = ctypes.util.find_library("c")
    if libc_name and "musl" not in libc_name:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(libc_name)
            m_trim_threshold, m_mmap_threshold = -1, -3
            # Blocks up to 32 MiB (glibc's ceiling) come from the heap, and the heap is not
            # handed back below 1 GiB. Disabling mmap entirely (M_MMAP_MAX=0) was measured
            # to fragment the heap to 4x the resident memory, so larger blocks stay mmapped.
            libc.mallopt(m_mmap_threshold, 32 * 2**20)
            libc.mallopt(m_trim_threshold, 2**30)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; a CUDA device that is absent is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


# Environment that limits every CPU kernel library torch uses to an older instruction set, so one
# machine can measure what a CPU without AVX-512 or AMX would run (ATen's own kernels, oneDNN,
# MKL). They are read when each library first dispatches: set them before the process starts.
CPU_ISA_ENV: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose bf16 matmuls beat fp32: those with AMX tiles, and those with AVX512-BF16
    where a timed matmul finds bf16 at least :data:`BF16_MARGIN` times faster (once per process).

    Measured on 2 cores with AMX: a (1024x128) @ (128x50304) product takes 1.8 ms in bf16 against
    5.0 ms in fp32 per 128 rows. AVX512-BF16 alone differs by CPU: on 2 Xeon cores without AMX
    (2026-11-30) the tiny training step took 192 ms in bf16 against 137 ms in fp32, while on 2 AMD
    EPYC cores (2026-12-04) it took 72 against 176 ms; hence the probe, not a flag rule.
    """
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if limit and "AMX" not in limit and limit not in ("ALL", "DEFAULT"):  # AMX off (CPU_ISA_ENV)
        return False
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    return _has_cpu_flag("avx512_bf16") and _bf16_matmul_speedup() >= BF16_MARGIN


BF16_MARGIN = 1.3  # measured speed-ups sit far on either side: 0.7x (Xeon) and 2.4x (AMD EPYC)


def _has_cpu_flag(flag: str) -> bool:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return any(flag in line.split() for line in lines if line.startswith("flags"))
    except OSError:  # not Linux: no probe, fp32 as before
        return False


def _bf16_matmul_speedup() -> float:
    """fp32 time over bf16 time of a (256x256) @ (256x8192) product, best of 3 each (~30 ms in all)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 8192, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        torch.mm(x, y)  # warm-up: kernel selection and the first page faults
        times = []
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast compute dtype; float32 means no autocast."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("--dtype float16 needs CUDA; use float32 or bfloat16")
    return dtype


def select_sdpa_backend(name: str, device: torch.device) -> None:
    """Let ``F.scaled_dot_product_attention`` use the named kernel alone ('auto': PyTorch's choice).

    Process-wide, as PyTorch's switches are; set before the first forward, so ``torch.compile``
    traces the chosen kernel. PyTorch's automatic order takes flash-attention 2 before cuDNN
    even on Hopper, where cuDNN's kernel is the faster one, hence the option. A named kernel is
    used exclusively: where it cannot run, SDPA raises (with PyTorch's reasons) rather than
    falling back to the slow math path unnoticed. 'auto' re-enables every kernel.
    """
    if name != "auto" and device.type != "cuda" and name not in ("flash", "math"):
        raise ConfigError(f"--sdpa-backend {name} needs CUDA; on {device.type} use auto, flash or math")
    b = torch.backends.cuda
    b.enable_flash_sdp(name in ("auto", "flash"))
    b.enable_cudnn_sdp(name in ("auto", "cudnn"))
    b.enable_mem_efficient_sdp(name in ("auto", "efficient"))
    b.enable_math_sdp(name in ("auto", "math"))


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast context for the forward pass (a no-op context for float32)."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included); Linux only."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; peak resident set size of the process elsewhere.

    On Linux the peak is the address space's own high-water mark (``VmHWM``): ``ru_maxrss`` carries
    the parent's peak over an exec, so a run started by a large process would report that one's.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
