"""Checkpoints are atomic: a write that dies halfway leaves the previous checkpoint loadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from gpt2.errors import UserError
from gpt2.trainer import checkpoint
from tests.conftest import REPO


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((256, 256), value)}, "step": int(value)}


def test_killed_write_leaves_previous_checkpoint(tmp_path) -> None:
    """SIGKILL in the middle of torch.save: the old file is intact and loads with its old content."""
    path = tmp_path / checkpoint.LAST
    checkpoint.save_atomic(path, _state(1.0))
    child = textwrap.dedent(
        f"""
        import os, signal, torch
        from gpt2.trainer import checkpoint
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        checkpoint.save_atomic({str(path)!r}, {{"model": {{"w": torch.zeros(3)}}, "step": 2}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, check=False)
    assert proc.returncode == -9  # it really died mid-write
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert leftovers, "the child should have died with its temporary file written"
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.full((256, 256), 1.0))


def test_failed_write_reports_and_keeps_previous(tmp_path, monkeypatch) -> None:
    """A full disk (ENOSPC) while writing: clear error, previous checkpoint intact, no temp file left."""
    path = tmp_path / checkpoint.LAST
    checkpoint.save_atomic(path, _state(1.0))

    def enospc(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(UserError, match=r"No space left on device.*previous one is intact"):
        checkpoint.save_atomic(path, _state(2.0))
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_truncated_checkpoint_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic(path, _state(1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"ckpt\.pt is corrupt or truncated"):
        checkpoint.load(path)


def test_foreign_file_is_rejected(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not a checkpoint written by this project"):
        checkpoint.load(path)


def test_numbered_checkpoints_are_bounded(tmp_path) -> None:
    for step in (10, 20, 30, 40):
        checkpoint.save_atomic(tmp_path / checkpoint.step_name(step), _state(float(step)))
        checkpoint.prune_numbered(tmp_path, keep=2)
    assert [s for s, _ in checkpoint.numbered(tmp_path)] == [30, 40]
