"""Compile a C kernel of this package once per machine, cache the library, load it with ctypes.

The library lands in a cache folder under a name made of the source's, the flags' and the
compiler's hash, so an edit, another ISA or another compiler builds a new one, and a second
process finds the first one's. It is compiled to a temporary name and renamed into place (atomic),
so processes compiling at once, or one killed while compiling, never leave a broken file or a
lock to wait on (``torch.utils.cpp_extension``'s file lock can hang forever after a kill).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = Path(__file__).parent
COMPILE_TIMEOUT_S = 120
# -march per ATEN_CPU_CAPABILITY (set by ``--isa``, see gpt2.runtime.CPU_ISA_ENV): the kernels are
# limited to the same instruction set as torch's own, so an ISA-limited measurement stays honest.
X86_MARCH = {"default": "x86-64", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}
# No -ffast-math: it would let the compiler drop NaNs (a diverged run must give a NaN loss).
BASE_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    """``$GPT2_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/gpt2-research/kernels`` (~/.cache by default)."""
    if env := os.environ.get("GPT2_KERNEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2-research" / "kernels"


def arch_flags() -> list[str]:
    """The target ISA: this CPU's, unless ``ATEN_CPU_CAPABILITY`` limits torch to an older one."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    limit = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    return [f"-march={X86_MARCH.get(limit, 'native')}"]


def compiler() -> str | None:
    """``$CC``, else ``cc`` or ``gcc`` from PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def load(name: str) -> ctypes.CDLL:
    """The compiled ``<name>.c`` of this package, built if this machine has none yet."""
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (cc/gcc) on PATH; set CC")
    source = SOURCES / f"{name}.c"
    flags = [*BASE_FLAGS, *arch_flags()]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{cc} --version failed: {e}") from e
    key = hashlib.sha256("\0".join([source.read_text(), *flags, version]).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"{name}-{key}.so"
    if not target.exists():
        _compile(cc, flags, source, folder, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise KernelUnavailable(f"cannot load {target}: {e}") from e


def _compile(compiler: str, flags: list[str], source: Path, folder: Path, target: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=target.stem + ".", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write to {folder} ({e}); set GPT2_KERNEL_CACHE") from e
    try:
        command = [compiler, *flags, str(source), "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed on {source.name}: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiling {source.name} failed: {e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
