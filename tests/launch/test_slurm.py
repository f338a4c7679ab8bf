"""The SLURM launcher on a real one-node cluster (``scripts/slurm_cluster.sh``, started by ``.ci/run``):
the runs equal the sequential ones bitwise, a job sent SIGTERM is requeued and resumes to the same
weights, and a coordinator killed and rerun collects without submitting anything twice.

Without a cluster and without root to start one, these tests skip with that reason; CI runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpt2.cli import parse
from gpt2.launch.coordinator import run_ablation
from tests.conftest import REPO
from tests.launch.conftest import ablation_argv, assert_same_runs, run_dirs

CLUSTER = ["bash", str(REPO / "scripts" / "slurm_cluster.sh")]
SLURM = ("--launcher", "slurm", "--threads", "1")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A cluster that answers: the running one, else one started here (and stopped afterwards)."""
    if shutil.which("sinfo") and subprocess.run([*CLUSTER, "status"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster answers, and starting one (scripts/slurm_cluster.sh start) needs root")
    ours = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode != 0
    started = subprocess.run([*CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, f"scripts/slurm_cluster.sh start failed:\n{started.stderr[-3000:]}"
    yield
    if ours:  # stop only what this session started
        subprocess.run([*CLUSTER, "stop"], capture_output=True, timeout=120)


@pytest.fixture(autouse=True)
def _no_jobs_left():
    """Whatever SLURM jobs a test leaves behind are cancelled afterwards."""
    yield
    subprocess.run(["scancel", "--name=gpt2-ablation"], capture_output=True)


def _scancel_term(job_id: str) -> None:
    """``scancel --signal=TERM`` to the step that runs the training (``<raw job id>.0``). SLURM 22.05
    refuses a job-level signal to an array task while other tasks of its array are pending ("Job can
    not be altered now"); a preemption or the time limit signals the steps just the same."""
    raw = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%A"], capture_output=True, text=True)
    assert raw.stdout.strip(), f"{job_id} is not in the queue"
    subprocess.run(["scancel", "--signal=TERM", f"{raw.stdout.strip()}.0"], check=True, timeout=60)


def _wait(condition, proc: subprocess.Popen, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the coordinator ended before {what}:\n{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        time.sleep(0.05)


def _jobs(out: Path) -> dict[str, dict]:
    return json.loads((out / "jobs.json").read_text())["jobs"]


def _queue() -> dict[str, str]:
    text = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True).stdout
    return {line.split("|")[0]: line for line in text.splitlines()}


def test_slurm_jobs_give_the_sequential_runs_bitwise(
    slurm_cluster, sequential, corpus_dir, data_dir, tmp_path
):
    out = tmp_path / "abl"
    summary = run_ablation(parse(ablation_argv(corpus_dir, data_dir, out, *SLURM)))
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    ids = [j["job_id"] for j in _jobs(out).values()]
    assert len(set(ids)) == 4 and len({i.split("_")[0] for i in ids}) == 1  # one array of four
    assert_same_runs(out, sequential)


def test_a_job_sent_sigterm_is_requeued_and_resumes_to_the_same_weights(
    slurm_cluster, coordinator, sequential, corpus_dir, data_dir, tmp_path
):
    out = tmp_path / "abl"
    proc = coordinator(ablation_argv(corpus_dir, data_dir, out, *SLURM))
    first = run_dirs(out)[("adamw", 1337)]
    _wait(lambda: (first / "checkpoint_last.pt").exists(), proc, "the first job saved a checkpoint")
    job_id = _jobs(out)["1"]["job_id"]
    assert not (first / "results.json").exists(), (
        "the job finished before the signal: the test proves nothing"
    )
    _scancel_term(job_id)
    _wait(lambda: "PENDING" in _queue().get(job_id, ""), proc, "the job was requeued")
    # SLURM holds a requeued job for 120 s (its fixed BeginTime); let it start now
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "[1/4] adamw (seed 1337): requeued" in stdout
    log = (first / "job.log").read_text()
    assert "stopped by SIGTERM" in log and f"slurm job {job_id}, restart 1" in log
    assert json.loads((first / "results.json").read_text())["resumed_from_step"] > 0
    assert _jobs(out)["1"]["job_id"] == job_id  # the same job, requeued: not a new submission
    assert_same_runs(out, sequential)


def test_a_killed_coordinator_rerun_collects_without_submitting_again(
    slurm_cluster, coordinator, corpus_dir, data_dir, tmp_path, capsys
):
    out = tmp_path / "abl"
    argv = ablation_argv(corpus_dir, data_dir, out, *SLURM)
    proc = coordinator(argv)
    _wait(lambda: (run_dirs(out)[("adamw", 1337)] / "results.json").exists(), proc, "a job finished")
    os.kill(proc.pid, signal.SIGKILL)  # the coordinator alone: its jobs are the cluster's
    proc.communicate()
    before = _jobs(out)
    submitted = sorted(p.name for p in (out / "slurm").glob("*_submitted.pkl"))
    summary = run_ablation(parse(argv))
    said = capsys.readouterr().out
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    assert {k: v["job_id"] for k, v in _jobs(out).items()} == {k: v["job_id"] for k, v in before.items()}
    assert sorted(p.name for p in (out / "slurm").glob("*_submitted.pkl")) == submitted
    assert "[1/4] adamw (seed 1337): done - finished earlier" in said
    assert "queued - " not in said  # nothing was submitted by the rerun
