"""The fault matrix: a stop signal at 20+ moments spread over every phase of a run and of an ablation.

For each moment: the process exits with status 0 within 10 s of the signal, says in one line where
it stopped, leaves a checkpoint that loads wherever there was training progress, and the same
command rerun with ``--resume auto`` ends with bitwise the weights of an uninterrupted run and
one evaluation record per evaluation step (an abandoned evaluation is redone, never recorded
half). Moments are hit exactly through fault points (:mod:`gpt2.faults`); a delay puts the signal
inside whatever runs then (a forward pass, a file write).

The default suite runs the cases in ``FAST`` (one per kind of phase); ``-m slow`` runs them all.
Run with ``-s`` to see the table (phase, moment, seconds to exit, weights equal).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.launch.coordinator import run_ablation
from gpt2.trainer import checkpoint
from gpt2.trainer.run import train_once
from tests.conftest import REPO, as_argv

EXIT_WITHIN_S = 10.0
ABLATE = "learning_rate=0.001,0.002"
ARMS = ("0.001", "0.002")


@dataclass(frozen=True)
class Case:
    id: str
    phase: str
    fault: str | None = None  # GPT2_FAULT; None: the test sends the signal itself
    external_after: float = 0.0  # seconds after launch, for fault=None
    kind: str = "run"  # run | ablation | sample | data
    progress: bool = True  # training progress was made: a checkpoint must be left
    finishes: bool = False  # the signal lands after the last step: the run ends as if unsignalled
    signum: int = signal.SIGTERM


def _f(point: str, at: int, after: float = 0.0, do: str = "sigterm", job: int | None = None) -> str:
    return (
        f"point={point},at={at},do={do}"
        + (f",after={after}" if after else "")
        + (f",job={job}" if job else "")
    )


# Run: 14 steps of 2 micro-steps; evaluations (2 splits x 2 batches) at steps 0, 4, 8, 12 and a final
# one at 14; checkpoints at 4, 8, 12 (best, last, numbered copy: 3 writes each) and at the end.
CASES = [
    Case("import", "start-up (importing torch)", None, external_after=1.0, progress=False),
    Case("build", "start-up (building the model)", _f("startup", 1), progress=False),
    Case("prepare", "data preparation", _f("data", 1), kind="data", progress=False),
    Case("eval0", "step-0 evaluation, first batch", _f("eval_batch", 1), progress=False),
    Case("eval0-mid", "step-0 evaluation, inside a forward", _f("eval_batch", 3, 0.002), progress=False),
    Case("step1", "first step, first micro-step", _f("micro_step", 1), progress=False),
    Case("accum", "step 3, between its micro-steps", _f("micro_step", 6)),
    Case("forward", "step 5, inside a forward pass", _f("micro_step", 9, 0.003)),
    Case("sigint", "step 6, SIGINT in a micro-step", _f("micro_step", 11, do="sigint"), signum=signal.SIGINT),
    Case("update", "step 7, before the optimizer update", _f("optimizer_step", 7)),
    Case("step-end", "after step 3 (bookkeeping)", _f("step_end", 3)),
    Case("before-save", "after step 4, before its checkpoint", _f("step_end", 4)),
    Case("eval4", "evaluation at step 4, first batch", _f("eval_batch", 5)),
    Case("eval8-mid", "evaluation at step 8, inside a forward", _f("eval_batch", 11, 0.002)),
    Case(
        "eval-sigint",
        "evaluation at step 12, SIGINT",
        _f("eval_batch", 14, do="sigint"),
        signum=signal.SIGINT,
    ),
    Case("write-best", "writing checkpoint_best.pt (step 4)", _f("checkpoint_write", 1)),
    Case("write-last", "writing checkpoint_last.pt (step 4)", _f("checkpoint_write", 2)),
    Case("write-numbered", "writing the numbered copy (step 8)", _f("checkpoint_write", 6)),
    Case("write-mid", "inside a checkpoint write (step 8)", _f("checkpoint_write", 5, 0.001)),
    Case("final-eval", "final evaluation (step 14)", _f("eval_batch", 18)),
    Case("final-write", "final checkpoint write", _f("checkpoint_write", 11), finishes=True),
    Case("sample", "sampling after training", _f("sample", 1, 0.05), kind="sample"),
    # An ablation runs each arm in its own process (GPT2_JOB = its place): a signal that stops one run
    # stops the ablation; ``arm`` is the coordinator's point before it starts each run.
    Case("arm1", "ablation: first run, step 5", _f("step_end", 5, job=1), kind="ablation"),
    Case(
        "arm1-eval", "ablation: first run, evaluation at step 8", _f("eval_batch", 9, job=1), kind="ablation"
    ),
    Case("arm2-start", "ablation: starting the second run", _f("arm", 2), kind="ablation"),
    Case("arm2", "ablation: second run, mid-step 9", _f("micro_step", 18, 0.002, job=2), kind="ablation"),
]
FAST = {"sigint", "eval4", "write-last", "arm2-start"}


def _flags(tiny_flags: dict, out: Path, **extra) -> dict:
    return dict(
        tiny_flags,
        dropout=0.1,  # random numbers in every step: a rewound step must give them back
        gradient_accumulation=2,
        max_iters=14,
        log_interval=2,
        eval_interval=4,
        eval_samples=2,
        save_checkpoint=True,
        checkpoint_interval=4,
        keep_checkpoints=2,
        output_dir=str(out),
        **extra,
    )


def _case_flags(case: Case, tiny_flags: dict, out: Path, data_dir: Path) -> dict:
    flags = _flags(tiny_flags, out)
    if case.kind == "ablation":
        flags["ablate"] = ABLATE
    if case.kind == "sample":
        flags |= dict(quiet=False, sample_tokens=400)
    if case.kind == "data":
        flags["data_dir"] = str(data_dir)
    return flags


def _weights(out: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.load(out / checkpoint.LAST)
    assert state["step"] == 14
    return state["model"]


def _eval_steps(out: Path) -> list[int]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir, data_dir) -> dict[str, Path]:
    """Uninterrupted runs: one training run, and the two-arm ablation."""
    from tests.conftest import tiny_run_flags

    root = tmp_path_factory.mktemp("reference")
    tiny = tiny_run_flags(corpus_dir, data_dir)
    train_once(resolve(_flags(tiny, root / "run")))
    flags = _flags(tiny, root / "ablation", ablate=ABLATE)
    run_ablation(resolve(flags, explicit=set(flags)))
    return {"run": root / "run", **{arm: root / "ablation" / arm for arm in ARMS}}


def _interrupt(case: Case, flags: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Run the command with the fault; returns the finished process and the seconds from the
    signal to the exit."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if case.fault:
        env["GPT2_FAULT"] = case.fault
    proc = subprocess.Popen(
        [sys.executable, "gpt2/train.py", *as_argv(flags)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = None
    if case.fault is None:
        time.sleep(case.external_after)
        sent = time.monotonic()
        proc.send_signal(case.signum)
    _, err = proc.communicate(timeout=300)
    done = time.monotonic()
    # an ablation's runs are processes of their own: a fault that fires in one is in its job.log
    logs = err + "".join(log.read_text() for log in Path(flags["output_dir"]).rglob("job.log"))
    fired = re.search(r"fault injected: \S+ at .*, monotonic ([\d.]+)", logs)
    if case.fault:
        assert fired, f"the fault never fired:\n{err[-3000:]}"
        sent = float(fired.group(1))
    assert sent is not None
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err), done - sent


def _check(case: Case, tiny_flags: dict, tmp_path: Path, reference: dict[str, Path]) -> None:
    out = tmp_path / "out"
    flags = _case_flags(case, tiny_flags, out, tmp_path / "fresh-data")
    proc, seconds = _interrupt(case, flags)
    err = proc.stderr
    assert proc.returncode == 0, err[-3000:]
    assert seconds < EXIT_WITHIN_S, f"{seconds:.1f} s to exit"
    name = signal.Signals(case.signum).name
    said = [line for line in err.splitlines() if line.startswith(f"stopped by {name}")]
    if case.finishes:
        assert not said and json.loads((out / "results.json").read_text())["stop_reason"] == "max_iters"
    else:
        assert len(said) == 1 or (case.kind == "ablation" and said), err[-3000:]
    runs = [reference["run"]] if case.kind != "ablation" else [reference[a] for a in ARMS]
    dirs = [out] if case.kind != "ablation" else [out / a for a in ARMS]
    for d in dirs:  # whatever was left is a checkpoint that loads
        if (d / checkpoint.LAST).exists():
            checkpoint.load(d / checkpoint.LAST)
    if case.progress:
        assert any((d / checkpoint.LAST).exists() for d in dirs), "training progress was lost"
        m = re.search(r"at step (\d+): checkpoint", err)
        if m and case.kind != "ablation":
            assert checkpoint.load(out / checkpoint.LAST)["step"] == int(m.group(1))

    resumed = dict(flags, resume="auto") if case.kind != "ablation" else flags  # an ablation resumes itself
    if case.kind == "ablation":
        run_ablation(resolve(resumed, explicit=set(resumed)))
    else:
        train_once(resolve(resumed))
    equal = True
    for d, ref in zip(dirs, runs, strict=True):
        got, want = _weights(d), _weights(ref)
        equal &= all(torch.equal(got[k], want[k]) for k in want)
        assert _eval_steps(d) == _eval_steps(ref), "one evaluation record per evaluation step"
    print(
        f"\nMATRIX | {case.phase} | {case.fault or f'external, {case.external_after:g} s'} | "
        f"{seconds:.2f} | {'yes' if equal else 'NO'}"
    )
    assert equal, "resumed weights differ from the uninterrupted run's"


@pytest.mark.parametrize(
    "case",
    [c if c.id in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=lambda c: c.id,
)
def test_stop_signal_at_this_moment_loses_nothing(case, tiny_flags, tmp_path, reference) -> None:
    _check(case, tiny_flags, tmp_path, reference)


def test_the_matrix_covers_every_phase() -> None:
    assert len(CASES) >= 20
    phases = " ".join(c.phase for c in CASES)
    for phase in (
        "start-up",
        "data preparation",
        "evaluation",
        "micro-step",
        "checkpoint",
        "sampling",
        "ablation",
    ):
        assert phase in phases, phase


def test_a_second_sigint_exits_at_once(tmp_path) -> None:
    """The first SIGINT is deferred (a checkpoint write, say); a second one ends the process at once."""
    code = (
        "import os, signal, time\n"
        "from gpt2.signals import installed, STOP\n"
        "with installed():\n"
        "    with STOP.deferring():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        assert STOP.signum == signal.SIGINT\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(30)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10
    assert "second interrupt" in proc.stderr


def test_a_signal_inside_the_mode_bookkeeping_leaves_the_mode_stack_intact() -> None:
    from gpt2.signals import Stopped, StopRequest

    stop = StopRequest()
    with stop.deferring():
        stop.signum = signal.SIGTERM  # recorded while deferred
        with pytest.raises(Stopped), stop.cancellable():  # raises on entry
            pass
        assert stop.deferred
    assert not stop.deferred and len(stop._modes) == 1
