"""The coordinator of an ablation: plan every (arm, seed) job, submit them to the chosen executor, watch
them, collect their results and rebuild the summary after every finished run.

It trains nothing itself: every run is ``gpt2/train.py --config <run>/config.toml`` in its own
process (so peak memory and timings are the run's own), started by :mod:`gpt2.launch.local` or
:mod:`gpt2.launch.slurm`. What it submitted is recorded in ``<output-dir>/jobs.json``; rerunning the
same command skips finished runs, watches the ones an earlier coordinator left queued or running,
and submits only the rest (an interrupted run resumes from its checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from gpt2 import config_file, faults
from gpt2.analysis import stats
from gpt2.analysis.summary import SUMMARY, summarize, summary_markdown, write_summary
from gpt2.config import RunConfig
from gpt2.errors import UserError
from gpt2.launch.outcome import outcome
from gpt2.launch.plan import Job, plan
from gpt2.signals import STOP, Stopped
from gpt2.track.metrics import write_json_atomic
from gpt2.trainer import checkpoint

JOBS_FILE = "jobs.json"
POLL_S = {"local": 0.1, "slurm": 2.0}  # how often job states are read
MAX_SUBMISSIONS = 3  # per coordinator: a SLURM job that keeps ending unfinished is then reported


class Executor(Protocol):
    """What the coordinator needs of a launcher (:mod:`.local`, :mod:`.slurm`)."""

    name: str  # "local" or "slurm"
    threads: int | None  # CPU threads each run is given (recorded in its config)

    def describe(self) -> str: ...  # how the runs are launched, for the summary

    def free(self) -> int: ...  # how many more jobs it takes now

    def submit(self, jobs: list[Job]) -> dict[int, dict]: ...  # job index -> what to record (job_id, pid)

    def reattach(self, job: Job, record: dict) -> bool: ...  # watch a job an earlier coordinator left

    def states(self) -> dict[int, str]: ...  # live job index -> queued | running | ended

    def live(self) -> list[Job]: ...

    def stop(self) -> None: ...  # pass a stop on to the running jobs (local) or leave them (slurm)


def make_executor(cfg: RunConfig) -> Executor:
    """The executor ``cfg`` asks for, checked against this machine (one line when it cannot work)."""
    launcher = cfg.launcher
    if launcher.launcher == "slurm":
        from gpt2.launch.slurm import SlurmExecutor

        gpus = launcher.gpus_per_run if "gpus_per_run" in cfg.explicit else None
        folder = Path(cfg.output.output_dir) / "slurm"
        return SlurmExecutor(launcher, folder, threads=cfg.train.threads or 1, gpus=gpus)
    from gpt2.launch.local import LocalExecutor

    cuda = 0
    if cfg.train.device != "cpu":
        import torch

        cuda = torch.cuda.device_count()
    if not cuda and launcher.ablation_workers > 1 and cfg.train.max_time > 0:
        raise UserError(
            "--max-time with --ablation-workers above 1 on CPU is refused: jobs that share this "
            "machine's cores and memory bandwidth train at speeds set by their neighbours, so arms would "
            "not get equal time. Use --max-iters (the results are then the sequential ones), or one worker"
        )
    return LocalExecutor(launcher.ablation_workers, launcher.gpus_per_run, cuda)


class _Board:
    """One line per job state change, a progress bar over runs, and the job table on disk."""

    def __init__(self, out: Path, jobs: list[Job], launcher: str) -> None:
        from tqdm import tqdm

        self.path, self.jobs = out / JOBS_FILE, {j.index: j for j in jobs}
        self.table: dict[str, Any] = {"launcher": launcher, "jobs": {}}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            old = json.loads(self.path.read_text())
            if old.get("launcher") == launcher:
                self.table["jobs"] = old.get("jobs", {})
        self.bar = tqdm(total=len(jobs), unit="run", desc="ablation", dynamic_ncols=True, disable=None)

    def record(self, job: Job) -> dict[str, Any]:
        return self.table["jobs"].setdefault(str(job.index), {"arm": job.arm.name, "seed": job.seed})

    def say(self, job: Job, state: str, detail: str = "") -> None:
        self.record(job)["state"] = state
        write_json_atomic(self.path, self.table)
        if state in ("done", "failed"):
            self.bar.update(1)
        n = len(self.jobs)
        self.bar.write(f"[{job.index}/{n}] {job.name}: {state}" + (f" - {detail}" if detail else ""))
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


def _dry_run(jobs: list[Job]) -> dict[str, Any]:
    """Build and step every arm's model in this process (no data, no files, nothing submitted)."""
    from gpt2.trainer.run import train_once

    runs, failed = [], []
    for job in jobs:
        print(f"=== dry run {job.index}/{len(jobs)}: {job.name} - {job.arm.description}", flush=True)
        record = {"step": job.arm.name, "seed": job.seed, "dir": str(job.dir)}
        try:
            info = train_once(job.config)
        except Exception as e:  # every arm is tried; the failures are listed together
            print(f"error: {e}", file=sys.stderr)
            failed.append(f"{job.name}: {type(e).__name__}: {e}")
            runs.append({**record, "status": "failed", "error": str(e)})
            continue
        runs.append({**record, "status": "dry-run", "loss": info["loss"], "n_params": info["n_params"]})
    print(f"ablation dry run: {len(jobs) - len(failed)}/{len(jobs)} steps ok")
    if failed:
        raise UserError(f"ablation dry run failed for {'; '.join(failed)}")
    return {"runs": runs}


def run_ablation(cfg: RunConfig, executor: Executor | None = None) -> dict[str, Any]:
    """Run every (arm, seed) of ``cfg``'s ablation as its own job; returns the summary (also on disk).

    After the summary is written: :class:`~gpt2.signals.Stopped` if a stop signal ended the
    ablation (rerun the command to continue), :class:`UserError` if a run failed (the others ran).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "an ablation launches its own runs: start it without torchrun (--gpus-per-run K runs each "
            "job under torchrun with K processes)"
        )
    if cfg.train.dry_run:  # one seed of each arm: seeds do not change what is built
        jobs, _, _, seeds = plan(cfg)
        return _dry_run([j for j in jobs if j.seed == seeds[0]])
    executor = executor or make_executor(cfg)
    jobs, arms, control, seeds = plan(cfg, executor.threads)  # every arm is checked before any runs
    out = Path(cfg.output.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file.write(cfg, out / config_file.CONFIG_TOML)  # the whole ablation, replayable
    board = _Board(out, jobs, executor.name)
    records: dict[int, dict[str, Any]] = {}
    launched = executor.describe()

    sequential = cfg.ablation.ablation_seeds == 0  # auto: seeds in rounds until the verdicts are decisive
    counts = list(range(stats.N_MIN, len(seeds) + 1)) if sequential else [len(seeds)]
    shown = [counts[0]]  # the seeds the summary covers (auto: those of the rounds begun)

    def rebuild(quiet: bool = True) -> dict[str, Any]:
        mine = [j for j in jobs if j.seed in seeds[: shown[0]]]
        runs = [
            records.get(j.index)
            or {"step": j.arm.name, "seed": j.seed, "dir": str(j.dir), "status": "not run"}
            for j in mine
        ]
        for r, j in zip(runs, mine, strict=True):
            r["description"] = j.arm.description
        summary = summarize(
            cfg,
            [a.name for a in arms],
            seeds[: shown[0]],
            runs,
            control,
            launched,
            decide_on=cfg.ablation.decide_on,
            margin=cfg.ablation.min_effect,
            sequential={"max_seeds": len(seeds), "alpha": stats.ALPHA} if sequential else None,
        )
        write_summary(out, summary, quiet)
        return summary

    what = f"{len(seeds)} seed(s)" if not sequential else f"2 to {len(seeds)} seeds (auto)"
    print(f"ablation: {len(arms)} arm(s) x {what}; {launched}", flush=True)
    todo: list[Job] = []
    for job in jobs:
        if outcome(job.results_path, job.log_path)["status"] == "done":
            records[job.index] = _record(job, {"status": "done"})
            board.say(job, "done", f"finished earlier, results in {job.results_path}")
        elif executor.reattach(job, board.record(job)):
            board.say(job, "running", f"still {board.record(job).get('job_id')} from an earlier coordinator")
        else:
            todo.append(job)
    stop: Stopped | None = None
    between = f"between ablation runs; rerun the same command to continue (finished runs are in {out})"
    try:
        with STOP.cancellable(between):
            for n in counts:  # one round per look of the sequential rule (one in all otherwise)
                shown[0] = max(shown[0], n)
                batch = [j for j in todo if j.seed in seeds[:n]]
                todo = [j for j in todo if j not in batch]
                stop = _watch(executor, board, batch, records, rebuild, cfg.output.save_checkpoint)
                if stop is not None or not sequential or _look(rebuild(), n, board):
                    break
    except Stopped as e:
        stop = e
    if stop is not None:
        with STOP.deferring():  # the runs save their checkpoints; a repeated signal changes nothing
            board.bar.write(f"stopping: passing {stop.name} on to the running jobs")
            executor.stop()
            for job in executor.live():
                records[job.index] = _record(job, {"status": "interrupted"})
    board.close()
    summary = rebuild(quiet=False)
    print(summary_markdown(summary))
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    if stop is not None:
        kept = "finished runs are kept" + (", running SLURM jobs go on" if executor.name == "slurm" else "")
        raise Stopped(stop.name, f"{stop.where}; rerun the same command to continue ({kept} in {out})")
    if failed:
        failures = "; ".join(f"{r['step']} (seed {r['seed']}): {r['error']}" for r in failed)
        raise UserError(
            f"{len(failed)} of {len(jobs)} ablation runs failed ({failures}); the others are in "
            f"{out / (SUMMARY + '.md')}"
        )
    return summary


def _look(summary: dict[str, Any], n: int, board: _Board) -> bool:
    """After the round of ``n`` seeds: say where every arm stands; whether the rounds are over."""
    if any(r["status"] == "failed" for r in summary["runs"]):
        board.bar.write(f"look at {n} seeds: a run failed, no further rounds")
        return True
    verdicts = ", ".join(f"{a['step']}: {a['verdict']}" for a in summary["by_step"] if a.get("verdict"))
    done = summary["sequential"]["decided"]
    board.bar.write(f"look at {n} seeds: {verdicts}" + ("; every arm decided" if done else ""))
    return done


def _record(job: Job, result: dict[str, Any]) -> dict[str, Any]:
    return {"step": job.arm.name, "seed": job.seed, "dir": str(job.dir), **result}


def _watch(
    executor: Executor, board: _Board, todo: list[Job], records: dict, rebuild: Any, keep_checkpoints: bool
) -> Stopped | None:
    """Submit as room allows and follow every job to its end; returns the stop a run reported, if any."""
    submissions: dict[int, int] = {}
    seen: dict[int, str] = {}  # each job's last state as the executor reported it
    while todo or executor.live():
        n = min(executor.free(), len(todo))
        if n:
            for job in todo[:n]:
                faults.point("arm")
                job.write_config()
            started = executor.submit(todo[:n])
            for job in todo[:n]:
                submissions[job.index] = submissions.get(job.index, 0) + 1
                board.record(job).update(started[job.index])
                seen[job.index] = "queued" if executor.name == "slurm" else "running"
                board.say(job, seen[job.index], started[job.index]["job_id"])
            todo = todo[n:]
        time.sleep(POLL_S[executor.name])
        for index, state in executor.states().items():
            job = board.jobs[index]
            before, seen[index] = seen.get(index), state
            if state != "ended":
                if state != before:
                    board.say(job, "requeued" if (before, state) == ("running", "queued") else state)
                continue
            result = outcome(job.results_path, job.log_path)
            records[index] = _record(job, result)
            if result["status"] == "done":
                if not keep_checkpoints:
                    _drop_resume_checkpoints(job)
                rebuild()
                board.say(job, "done", _brief(job))
            elif result["status"] == "failed":
                rebuild()
                board.say(job, "failed", result["error"])
            elif executor.name == "slurm" and submissions.get(index, 0) < MAX_SUBMISSIONS:
                board.say(job, "requeued", f"ended unfinished ({result['stop_reason']}): submitted again")
                todo.append(job)
            else:  # a local run stopped by a signal: the whole ablation stops with it
                board.say(job, "interrupted", result["stop_reason"])
                name = str(result["stop_reason"]).replace("signal ", "").replace("stopped by ", "").split()[0]
                return Stopped(name, f"in run {job.name}")
    return None


def _brief(job: Job) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError):
        r = json.loads(job.results_path.read_text())
        return f"val loss {r['final_val_loss']:.4f}, {r['iters']} steps, {r['train_time_s']:.1f} s training"
    return ""


def _drop_resume_checkpoints(job: Job) -> None:
    """A run's checkpoints were kept only to resume it (the ablation did not ask for them)."""
    for name in (checkpoint.LAST, checkpoint.BEST):
        with contextlib.suppress(OSError):
            (job.dir / name).unlink()
