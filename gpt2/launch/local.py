"""Jobs as processes on this machine, up to ``--ablation-workers`` at once, each on its own devices.

On CUDA each worker slot owns ``--gpus-per-run`` GPUs (``CUDA_VISIBLE_DEVICES``); on CPU it owns an
equal share of the cores (its affinity) and the run's ``--threads`` is that share. Children stay in
the coordinator's process group, so ^C in a terminal reaches every run at once; the coordinator
also passes its own stop signal on (a repeated signal changes nothing in a run). A child outlives
a coordinator killed with SIGKILL; the next coordinator finds it by pid and waits for it instead
of starting the run twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpt2.errors import UserError
from gpt2.launch.outcome import start_line
from gpt2.launch.plan import Job
from gpt2.runtime import cpu_threads


@dataclass
class Slot:
    """What one worker runs on: CPU cores (None: no pinning) and GPU indices (None: CPU jobs)."""

    cpus: list[int] | None
    gpus: list[int] | None
    job: Job | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None  # a run started by an earlier coordinator, watched by pid alone


@dataclass
class LocalExecutor:
    workers: int
    gpus_per_run: int
    cuda_devices: int  # GPUs this machine has (0: CPU jobs)
    slots: list[Slot] = field(default_factory=list)

    name = "local"

    def __post_init__(self) -> None:
        if self.cuda_devices:
            need = self.workers * self.gpus_per_run
            if need > self.cuda_devices:
                raise UserError(
                    f"--ablation-workers {self.workers} x --gpus-per-run {self.gpus_per_run} needs {need} "
                    f"GPUs; this machine has {self.cuda_devices}"
                )
            k = self.gpus_per_run
            self.slots = [Slot(None, list(range(i * k, (i + 1) * k))) for i in range(self.workers)]
            return
        if self.gpus_per_run > 1:
            raise UserError("--gpus-per-run: no CUDA GPU on this machine")
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if self.workers == 1 or len(cores) < self.workers:
            self.slots = [Slot(None, None) for _ in range(self.workers)]  # unpinned
            return
        share = len(cores) // self.workers
        self.slots = [Slot(cores[i * share : (i + 1) * share], None) for i in range(self.workers)]

    @property
    def threads(self) -> int | None:
        """The CPU threads each run gets (None on CUDA: a run's own default)."""
        if self.cuda_devices:
            return None
        if self.workers == 1:
            return cpu_threads()
        return len(self.slots[0].cpus) if self.slots[0].cpus else 1

    def describe(self) -> str:
        """How the runs are launched, for the summary."""
        if self.cuda_devices:
            each = f"{self.gpus_per_run} GPU(s) each"
        else:
            split = ", cores split between them" if self.slots[0].cpus else ""
            each = f"{self.threads} thread(s) each{split}"
        return f"local processes, {len(self.slots)} at once, {each}"

    def free(self) -> int:
        return sum(s.job is None for s in self.slots)

    def live(self) -> list[Job]:
        return [s.job for s in self.slots if s.job is not None]

    def reattach(self, job: Job, record: dict) -> bool:
        """Watch ``job`` if the process an earlier coordinator started for it still runs it."""
        pid = record.get("pid")
        if not pid or not _runs(pid, job.config_path) or self.free() == 0:
            return False
        slot = next(s for s in self.slots if s.job is None)
        slot.job, slot.pid = job, pid
        return True

    def submit(self, jobs: list[Job]) -> dict[int, dict]:
        """Start ``jobs`` (at most :meth:`free` of them); returns what to record for each."""
        started = {}
        for job in jobs:
            slot = next(s for s in self.slots if s.job is None)
            env = dict(os.environ, GPT2_JOB=str(job.index))
            if slot.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.gpus))
            job.dir.mkdir(parents=True, exist_ok=True)
            with open(job.log_path, "ab") as log:
                log.write(start_line("local process"))
                log.flush()
                proc = subprocess.Popen(
                    job.command(self.gpus_per_run if slot.gpus else 1),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            if slot.cpus is not None:  # before the run's interpreter has started a thread
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(proc.pid, slot.cpus)
            slot.job, slot.proc, slot.pid = job, proc, proc.pid
            started[job.index] = {"pid": proc.pid, "job_id": f"pid {proc.pid}"}
        return started

    def states(self) -> dict[int, str]:
        """``running`` or ``ended`` for every live job; an ended one frees its slot."""
        out = {}
        for slot in self.slots:
            if slot.job is None:
                continue
            if slot.proc is not None:
                ended = slot.proc.poll() is not None
            else:
                ended = not _runs(slot.pid, slot.job.config_path)
            out[slot.job.index] = "ended" if ended else "running"
            if ended:
                slot.job = slot.proc = slot.pid = None
        return out

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 600) -> None:
        """Pass the stop on to every running job and wait until each has saved and exited."""
        running = [s for s in self.slots if s.job is not None]
        for s in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.pid, signum)
        deadline = time.monotonic() + timeout_s
        for s in running:
            while time.monotonic() < deadline:
                if (s.proc.poll() is not None) if s.proc else not _runs(s.pid, s.job.config_path):
                    break
                time.sleep(0.05)


def _runs(pid: int, config_path: Path) -> bool:
    """Whether process ``pid`` is alive and is the run of ``config_path`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and str(config_path).encode() in cmdline
