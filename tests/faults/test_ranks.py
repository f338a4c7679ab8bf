"""A rank that fails under torchrun (2 CPU ranks, gloo): no rank is left hanging, and with
``--max-restarts`` the job restarts from its last complete checkpoint and ends with bitwise the
weights of an uninterrupted run."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpt2.trainer import checkpoint
from tests.conftest import REPO, as_argv
from tests.trainer.test_distributed import _env as torchrun_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
SURVIVOR_EXIT_S = 35.0  # torchrun's SIGTERM-then-SIGKILL grace is 30 s; ours must not need it


def _flags(tiny_flags: dict, out: Path) -> dict:
    return dict(
        tiny_flags,
        batch_size=2,
        dropout=0.1,
        max_iters=12,
        log_interval=2,
        eval_interval=6,
        save_checkpoint=True,
        checkpoint_interval=3,
        dist_timeout=60,
        output_dir=str(out),
    )


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in torchrun_env().items() if k != "GPT2_FAULT"}
    return env | ({"GPT2_FAULT": fault} if fault else {})


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's current workers."""
    found = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(child)
    return found


class _Job:
    """A torchrun job whose stderr is read as it comes, and whose generation-0 workers are watched:
    ``exited[rank]`` is the monotonic time each one was seen gone."""

    def __init__(self, args: list[str], fault: str | None) -> None:
        self.proc = subprocess.Popen(
            [*TORCHRUN, *args],
            cwd=REPO,
            env=_env(fault),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.err: list[str] = []
        self.exited: dict[int, float] = {}
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        pids: dict[int, int] = {}
        while self.proc.poll() is None and len(pids) < 2:
            with_pids = _workers(self.proc.pid) if Path(f"/proc/{self.proc.pid}").exists() else {}
            pids.update(with_pids)
            time.sleep(0.02)
        while self.proc.poll() is None and len(self.exited) < len(pids):
            for rank, pid in pids.items():
                if rank not in self.exited and not _alive(pid):
                    self.exited[rank] = time.monotonic()
            time.sleep(0.02)

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        time.sleep(0.2)  # the reader thread drains the pipe
        return rc, "".join(self.err)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return status != "Z"


def _fired_at(err: str) -> float:
    m = re.search(r"fault injected: \S+ at .*, monotonic ([\d.]+)", err)
    assert m, f"the fault never fired:\n{err[-3000:]}"
    return float(m.group(1))


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank(tiny_flags, tmp_path) -> None:
    flags = _flags(tiny_flags, tmp_path / "out")
    job = _Job(["gpt2/train.py", *as_argv(flags)], "point=step_end,at=5,do=raise,rank=1")
    t0 = time.monotonic()
    rc, err = job.wait()
    assert rc != 0 and "injected fault at step_end #5" in err
    assert time.monotonic() - t0 < 120
    assert set(job.exited) == {0, 1}
    survivor_s = job.exited[0] - job.exited[1]  # rank 1 exits as it raises
    print(f"\nsurvivor (rank 0) exited {survivor_s:.2f} s after rank 1 raised")
    assert survivor_s < SURVIVOR_EXIT_S


@pytest.mark.slow
def test_torchrun_restarts_after_a_killed_rank_and_matches_an_uninterrupted_run(tiny_flags, tmp_path) -> None:
    """SIGKILL to rank 1 after step 7 (checkpoint at 6): rank 0 exits, torchrun restarts both,
    --resume auto continues from step 6, and the final weights equal the uninterrupted job's."""
    reference = _flags(tiny_flags, tmp_path / "reference")
    rc, err = _Job(["gpt2/train.py", *as_argv(reference)], None).wait()
    assert rc == 0, err[-3000:]

    flags = dict(_flags(tiny_flags, tmp_path / "killed"), resume="auto")
    job = _Job(
        ["--max-restarts=1", "gpt2/train.py", *as_argv(flags)],
        "point=step_end,at=7,do=sigkill,rank=1,restart=0",
    )
    rc, err = job.wait()
    assert rc == 0, err[-3000:]  # rank 1 was killed (below): only a restart can have finished the job
    killed = _fired_at(err)
    survivor_s = job.exited[0] - killed
    print(f"\nsurvivor (rank 0) exited {survivor_s:.2f} s after rank 1 was killed")
    assert survivor_s < SURVIVOR_EXIT_S
    want = checkpoint.load(tmp_path / "reference" / checkpoint.LAST)
    got = checkpoint.load(tmp_path / "killed" / checkpoint.LAST)
    assert got["step"] == want["step"] == 12
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
