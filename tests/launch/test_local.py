"""The local launcher: parallel workers reproduce the sequential runs bitwise, a failing run is
reported with its log while the others finish, and a stop reaches every running job."""

from __future__ import annotations

import json
import signal
import time

import pytest

from gpt2.cli import parse
from gpt2.errors import UserError
from gpt2.launch.coordinator import run_ablation
from tests.launch.conftest import ablation_argv, assert_same_runs, run_dirs


def test_two_workers_give_the_sequential_runs_bitwise(sequential, corpus_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "abl"
    summary = run_ablation(parse(ablation_argv(corpus_dir, data_dir, out, "--ablation-workers", "2")))
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    assert {r["threads"] for r in summary["runs"]} == {1}  # a 2-core machine: one core per worker
    assert "local processes, 2 at once, 1 thread(s) each" in summary["launched"]
    assert_same_runs(out, sequential)


@pytest.mark.slow  # (the default suite's time: the fake executor and the fault matrix cover this)
def test_a_failing_run_is_reported_with_its_log_tail_and_the_others_finish(
    corpus_dir, data_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("GPT2_FAULT", "point=step_end,at=3,do=raise,job=2")  # read by the runs only
    out = tmp_path / "abl"
    argv = ablation_argv(corpus_dir, data_dir, out, "--ablation-workers", "2", "--max-iters", "6")
    with pytest.raises(UserError, match=r"1 of 4 ablation runs failed \(adamw \(seed 1338\): RuntimeError"):
        run_ablation(parse(argv))
    summary = json.loads((out / "ablation_summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done", "failed", "done", "done"]
    failed = summary["runs"][1]
    assert "injected fault at step_end #3" in failed["error"]
    assert len(failed["log_tail"]) > 5 and failed["log_tail"][-1] == failed["error"]  # the traceback's end
    assert "injected fault at step_end #3" in (out / "ablation_summary.md").read_text()


@pytest.mark.slow  # (the default suite's time: the fake executor and the fault matrix cover this)
def test_a_stop_signal_reaches_every_running_job_and_the_rerun_ends_bitwise_equal(
    sequential, coordinator, corpus_dir, data_dir, tmp_path
) -> None:
    """SIGTERM to the coordinator while two runs train: both save and stop, the coordinator exits 0
    saying so, and the same command rerun resumes both to the uninterrupted weights."""
    out = tmp_path / "abl"
    argv = ablation_argv(corpus_dir, data_dir, out, "--ablation-workers", "2")
    proc = coordinator(argv)
    first = [run_dirs(out)[("adamw", s)] for s in (1337, 1338)]
    deadline = time.monotonic() + 120
    while not all((d / "checkpoint_last.pt").exists() for d in first):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.monotonic() - sent < 20, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "rerun the same command to continue" in stderr
    stopped = [d for d in first if "stopped by SIGTERM" in (d / "job.log").read_text()]
    assert len(stopped) == 2, "both running jobs got the stop"
    assert not any((d / "results.json").exists() for d in run_dirs(out).values() if d not in first)
    summary = run_ablation(parse(argv))
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    assert_same_runs(out, sequential)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ablation-workers", "2"], "--ablation-workers launches ablation runs: give --ablate"),
        (
            ["--ablate", "optimizer=adamw,muon", "--slurm-partition", "gpu"],
            "--slurm-partition needs --launcher slurm",
        ),
        (
            ["--ablate", "optimizer=adamw,muon", "--launcher", "slurm", "--ablation-workers", "2"],
            "--ablation-workers is for --launcher local",
        ),
        (
            ["--ablate", "optimizer=adamw,muon", "--launcher", "slurm", "--slurm-extra", "qos"],
            "write KEY=VALUE",
        ),
    ],
)
def test_launcher_flags_are_checked_up_front(extra, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--model-name", "tiny", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_time_budget_with_parallel_cpu_workers_is_refused(tmp_path) -> None:
    cfg = parse(
        ["--model-name", "tiny", "--device", "cpu", "--max-time", "30", "--output-dir", str(tmp_path / "a"),
         "--ablate", "optimizer=adamw,muon", "--ablation-workers", "2"]
    )  # fmt: skip
    with pytest.raises(UserError, match="--max-time with --ablation-workers above 1 on CPU is refused"):
        run_ablation(cfg)
    assert not (tmp_path / "a").exists()
