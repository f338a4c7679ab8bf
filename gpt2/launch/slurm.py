"""Jobs on a SLURM cluster through submitit: one job per (arm, seed), submitted as one array.

Preemption and time limits use submitit's own hook. The jobs are submitted with
``SUBMITIT_PREEMPT_SIGNAL=TERM`` and ``--signal=TERM@90``, so SLURM's SIGTERM (``scancel --signal=TERM``,
a preemption, or 90 s before ``--slurm-time`` runs out) reaches both submitit's handler and the run.
The run's own stop handler writes its checkpoint and exits; submitit calls
:meth:`TrainJob.checkpoint`, which waits for that exit, and requeues the job (``scontrol requeue``,
the same job id); the requeued job resumes with ``--resume auto``. We use submitit's hook rather
than sbatch ``--requeue`` alone because SLURM requeues only on node failure or preemption by its
own policy, not on a signal or a time limit; ``--requeue`` is still set, so that a cluster whose
default is ``JobRequeue=0`` accepts the requeue.

Job states come from ``squeue`` (``sacct`` needs SLURM's accounting database, which small clusters
lack); outcomes come from the runs' folders, as for every launcher.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from gpt2.config import LauncherSection, slurm_extra
from gpt2.errors import UserError
from gpt2.launch.outcome import finished, start_line
from gpt2.launch.plan import REPO, Job

PREEMPT_SIGNAL = "TERM"
SIGNAL_DELAY_S = 90
# squeue's states of a job that is still the cluster's business (anything else has ended)
LIVE_STATES = {
    "PENDING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "STAGE_OUT": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
}


class TrainJob:
    """What submitit runs inside a SLURM job: the run's command line as a child process, its output
    appended to the run's ``job.log``. A child process (not the run inside submitit's own process)
    keeps the run's signal handling and exit status exactly those of ``gpt2/train.py``."""

    def __init__(self, command: list[str], log_path: str, results_path: str) -> None:
        self.command, self.log_path, self.results_path = command, log_path, results_path
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> str:
        if finished(Path(self.results_path)):  # a requeue after the run had finished
            return "finished earlier"
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = "_".join(array) if all(array) else os.environ.get("SLURM_JOB_ID")
        with open(self.log_path, "ab") as log:
            log.write(start_line(f"slurm job {job_id}, restart {restarts}"))
            log.flush()
            self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
            while self._proc.poll() is None:  # (not wait(): checkpoint() may run in between)
                time.sleep(0.5)
        if self._proc.returncode != 0:
            raise RuntimeError(f"the run exited with status {self._proc.returncode}; see {self.log_path}")
        return "finished" if finished(Path(self.results_path)) else "stopped"

    def checkpoint(self) -> Any:
        """submitit's preemption hook (on SIGTERM): let the run save and exit, then requeue this job."""
        import submitit

        proc = self._proc
        if proc is not None:
            try:
                os.kill(proc.pid, signal.SIGTERM)  # in case SLURM signalled this process alone
                # wait without reaping: the interrupted poll() above may hold Popen's lock
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except (ProcessLookupError, ChildProcessError):
                pass
        return submitit.helpers.DelayedSubmission(TrainJob(self.command, self.log_path, self.results_path))


class SlurmExecutor:
    """Submits :class:`TrainJob` s with submitit; reads their states with squeue."""

    name = "slurm"

    def __init__(self, launcher: LauncherSection, folder: Path, threads: int, gpus: int | None) -> None:
        self.folder, self.threads, self.gpus = folder, threads, gpus
        self.settings = launcher
        self._live: dict[int, str] = {}  # job index -> SLURM job id, while queued or running
        self._jobs: dict[int, Job] = {}
        self._snapshot: dict[str, str] | None = None  # the queue when a rerun started
        if not shutil.which("sbatch") or not shutil.which("squeue"):
            raise UserError("--launcher slurm: sbatch and squeue are not on PATH (no SLURM client here)")

    @property
    def gpus_per_run(self) -> int:
        return self.gpus or 1

    def describe(self) -> str:
        """How the runs are launched, for the summary."""
        gpus = f", {self.gpus} GPU(s)" if self.gpus else ""
        return f"SLURM jobs through submitit, {self.threads} CPU(s){gpus} each"

    def free(self) -> int:
        return 1 << 30  # the cluster queues what it has no room for

    def live(self) -> list[Job]:
        return [self._jobs[i] for i in self._live]

    def _executor(self) -> Any:
        import submitit

        s = self.settings
        ex = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=3)
        params: dict[str, Any] = dict(
            time=s.slurm_time,
            nodes=1,
            ntasks_per_node=1,
            cpus_per_task=self.threads,
            signal_delay_s=SIGNAL_DELAY_S,
            job_name="gpt2-ablation",
            setup=[
                f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}",
                f'export PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"',  # the pickled job imports gpt2
            ],
            additional_parameters={"requeue": True, "signal": f"{PREEMPT_SIGNAL}@{SIGNAL_DELAY_S}"}
            | slurm_extra(s.slurm_extra),
        )
        if s.slurm_partition:
            params["partition"] = s.slurm_partition
        if s.slurm_account:
            params["account"] = s.slurm_account
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        ex.update_parameters(**params)
        return ex

    def submit(self, jobs: list[Job]) -> dict[int, dict]:
        if not jobs:
            return {}
        ex = self._executor()
        subs = []
        try:
            with ex.batch():  # one sbatch: a job array
                for job in jobs:
                    job.dir.mkdir(parents=True, exist_ok=True)
                    task = TrainJob(job.command(self.gpus_per_run), str(job.log_path), str(job.results_path))
                    subs.append(ex.submit(task))
        except Exception as e:  # sbatch refused (bad partition, account, option): one line
            raise UserError(f"--launcher slurm: submission failed: {str(e).strip().splitlines()[-1]}") from e
        out = {}
        for job, sub in zip(jobs, subs, strict=True):
            self._live[job.index], self._jobs[job.index] = sub.job_id, job
            out[job.index] = {"job_id": sub.job_id}
        return out

    def reattach(self, job: Job, record: dict) -> bool:
        """Watch ``job`` if the job recorded for it is still queued or running."""
        job_id = record.get("job_id")
        if self._snapshot is None:  # one squeue for all the jobs a rerun looks for
            self._snapshot = self._queue()
        if not job_id or job_id not in self._snapshot:
            return False
        self._live[job.index], self._jobs[job.index] = job_id, job
        return True

    def states(self) -> dict[int, str]:
        """``queued``, ``running`` or ``ended`` for every live job."""
        queue = self._queue()
        out = {}
        for index, job_id in list(self._live.items()):
            out[index] = queue.get(job_id, "ended")
            if out[index] == "ended":
                del self._live[index]
        return out

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 0) -> None:
        """Nothing: the jobs are the cluster's; a rerun of the command collects them."""

    @staticmethod
    def _queue() -> dict[str, str]:
        """This user's jobs in squeue: job id (``123`` or ``123_4``) -> queued or running."""
        try:
            text = subprocess.run(
                ["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--format=%i|%T"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        except (subprocess.SubprocessError, OSError) as e:
            raise UserError(f"--launcher slurm: squeue failed ({e})") from e
        out = {}
        for line in text.splitlines():
            job_id, _, state = line.strip().partition("|")
            if state in LIVE_STATES:
                out[job_id] = LIVE_STATES[state]
        return out
