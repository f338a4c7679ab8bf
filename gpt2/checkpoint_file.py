"""Checkpoint files: written atomically (complete or absent, never torn), read with a clear error.

Training (:mod:`gpt2.trainer.checkpoint` assembles what goes in) and the tools that read a
trained model (:mod:`gpt2.sample`) share this module; it knows nothing of the trainer.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from gpt2 import faults
from gpt2.errors import UserError

FORMAT_VERSION = 2  # 2: pruning masks in the pruning extension's state, never the optimizer's
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
_STEP_RE = re.compile(r"checkpoint_step_(\d+)\.pt$")


def step_name(step: int) -> str:
    return f"checkpoint_step_{step:07d}.pt"


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash or a full disk at any moment leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        faults.point("checkpoint_write")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(
            f"could not write checkpoint {path}: {e.strerror or e}; the previous one is intact"
        ) from e
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; a missing, truncated or foreign file is a clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for torn zip archives and bad pickles
        raise UserError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
            "delete it or resume from another checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise UserError(f"{path} is not a checkpoint written by this project")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state['format_version']}, newer than this code")
    return _upgrade(state)


def numbered(output_dir: Path) -> list[tuple[int, Path]]:
    """The step-numbered checkpoints in ``output_dir``, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint_step_*.pt"):
        m = _STEP_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_numbered(output_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent step-numbered checkpoints."""
    for _, p in numbered(output_dir)[: max(0, len(numbered(output_dir)) - keep)]:
        with contextlib.suppress(OSError):
            p.unlink()


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: AdamWPrune's masks move from the optimizer state to the pruning extension's."""
    optim = state.get("optimizer")
    if isinstance(optim, dict) and "prune" in optim:
        optim = dict(optim)
        prune = optim.pop("prune")
        pruning = dict(state.get("extensions", {}).get("pruning", {}))
        pruning.setdefault("masks", {"names": prune["names"], "masks": prune["masks"]})
        state = {
            **state,
            "optimizer": optim,
            "extensions": {**state.get("extensions", {}), "pruning": pruning},
        }
    return state
