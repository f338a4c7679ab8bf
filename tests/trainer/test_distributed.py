"""torchrun on CPU (gloo): DDP equals one process with the same global batch; multi-node rendezvous."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2.config import resolve
from gpt2.data.loader import TokenBatches
from gpt2.trainer import checkpoint
from gpt2.trainer.loop import Trainer
from tests.conftest import REPO, as_argv

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _flags(tiny_flags: dict, out: Path) -> dict:
    return dict(
        tiny_flags,
        batch_size=2,
        gradient_accumulation=1,
        dropout=0.0,
        max_iters=4,
        log_interval=2,
        eval_interval=4,
        save_checkpoint=True,
        checkpoint_interval=4,
        output_dir=str(out),
    )


def _torchrun(
    flags: dict, nproc: int = 2, script: str = "gpt2/train.py", check: bool = True
) -> subprocess.CompletedProcess:
    """``script`` under torchrun on one node; the trainer gets ``flags`` as options, any other
    script gets them as one ``repr`` argument. ``check``: it must succeed."""
    args = as_argv(flags) if script == "gpt2/train.py" else [repr(flags)]
    proc = subprocess.run(
        [*TORCHRUN, f"--nproc_per_node={nproc}", "--master_port", str(_free_port()), script, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


class _TwoRankStreams(Trainer):
    """One process that sees, per step, rank 0's micro-batch then rank 1's: DDP's global batch."""

    def _setup_data(self) -> None:
        super()._setup_data()
        streams = [
            TokenBatches(
                self.data.data_dir,
                block_size=32,
                batch_size=2,
                device="cpu",
                seed=self.cfg.train.seed,
                rank=r,
                world_size=2,
            )
            for r in (0, 1)
        ]
        turn = iter(range(10**9))
        self.data.train_batch = lambda: streams[next(turn) % 2].train_batch()


def test_ddp_equals_single_process_with_same_global_batch(tiny_flags, tmp_path) -> None:
    ddp_out = tmp_path / "ddp"
    flags = _flags(tiny_flags, ddp_out)
    _torchrun(flags)

    single_out = tmp_path / "single"
    trainer = _TwoRankStreams(resolve(dict(_flags(tiny_flags, single_out), gradient_accumulation=2)))
    trainer.fit()

    a = checkpoint.load(ddp_out / checkpoint.LAST)["model"]
    b = checkpoint.load(single_out / checkpoint.LAST)["model"]
    moved = checkpoint.load(ddp_out / checkpoint.LAST)["step"]
    assert moved == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)

    # rank 0 alone wrote: one record per log step, one results file reporting both ranks
    records = [json.loads(x) for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "lr" in r]
    assert train_steps == [2, 4]
    results = json.loads((ddp_out / "results.json").read_text())
    assert results["world_size"] == 2 and results["tokens_seen"] == 4 * 2 * 2 * 32
    assert sorted(p.name for p in ddp_out.iterdir()) == [
        "checkpoint_best.pt",
        "checkpoint_last.pt",
        "config.toml",  # rank 0 alone writes
        "metrics.jsonl",
        "results.json",
    ]


@pytest.mark.parametrize("nodes", [2])
def test_two_node_rendezvous_on_loopback(tiny_flags, tmp_path, nodes) -> None:
    """Two torchrun launchers (1 process each) meet through the c10d rendezvous and train."""
    port = _free_port()
    flags = _flags(tiny_flags, tmp_path / "out")
    launchers = [
        subprocess.Popen(
            [
                *TORCHRUN,
                f"--nnodes={nodes}",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=gpt2-test",
                "gpt2/train.py",
                *as_argv(flags),
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(nodes)
    ]
    outputs = [p.communicate(timeout=300) for p in launchers]
    for p, (_, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["world_size"] == nodes and results["iters"] == 4


def test_fsdp_matches_ddp_and_its_checkpoint_loads_in_one_process(tiny_flags, tmp_path) -> None:
    flags = dict(_flags(tiny_flags, tmp_path / "ddp"), log_interval=1)
    _torchrun(flags)
    _torchrun(dict(flags, output_dir=str(tmp_path / "fsdp"), parallel="fsdp"))

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["train_loss"] for r in map(json.loads, lines) if "lr" in r]

    ddp, fsdp = losses("ddp"), losses("fsdp")
    assert len(ddp) == len(fsdp) == 4
    for a, b in zip(ddp, fsdp):
        assert abs(a - b) < 1e-5, (ddp, fsdp)

    # the FSDP checkpoint holds full tensors and resumes in a single process
    state = checkpoint.load(tmp_path / "fsdp" / checkpoint.LAST)
    assert state["optimizer_format"] == "by_name"
    ref = checkpoint.load(tmp_path / "ddp" / checkpoint.LAST)["model"]
    for k, v in ref.items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=1e-5, msg=k)
    single = dict(flags, output_dir=str(tmp_path / "fsdp"), max_iters=6, resume="auto")
    results = Trainer(resolve(single)).fit()
    assert results["iters"] == 6


_MASK_DUMP = """
import sys, torch
from gpt2.config import resolve
from gpt2.trainer.loop import Trainer
from gpt2.trainer.run import extensions_for
from gpt2.trainer.distributed import from_env, shutdown
cfg = resolve(eval(sys.argv[1]))
trainer = Trainer(cfg, extensions_for(cfg))
trainer.fit()
prune = next(e for e in trainer.extensions if e.name == "pruning")
torch.save([m.clone() for m in prune.masks.masks], f"{cfg.output.output_dir}/masks_rank{from_env().rank}.pt")
shutdown()
"""


def test_ddp_pruning_keeps_identical_masks_on_every_rank(tiny_flags, tmp_path) -> None:
    out = tmp_path / "pruned"
    flags = dict(
        _flags(tiny_flags, out),
        max_iters=12,
        pruning_method="magnitude",
        target_sparsity=0.5,
        pruning_warmup=2,
        pruning_frequency=2,
        quiet=True,
    )
    script = tmp_path / "dump_masks.py"
    script.write_text(_MASK_DUMP)
    _torchrun(flags, script=str(script))
    r0, r1 = (torch.load(out / f"masks_rank{r}.pt") for r in (0, 1))
    assert len(r0) == len(r1) > 0
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))
    pruned = sum(int((~m).sum()) for m in r0) / sum(m.numel() for m in r0)
    assert abs(pruned - 0.5) < 0.005


def test_an_ablation_under_torchrun_is_refused_with_the_flag_that_does_it(tiny_flags, tmp_path) -> None:
    """The coordinator launches its runs (each under torchrun with --gpus-per-run K); started under
    torchrun itself, every rank would launch them all."""
    flags = dict(_flags(tiny_flags, tmp_path / "abl"), ablate="learning_rate=0.001,0.002")
    proc = _torchrun(flags, check=False)
    assert proc.returncode != 0
    assert "start it without torchrun (--gpus-per-run K" in proc.stderr
    assert not (tmp_path / "abl").exists()


@pytest.mark.slow
def test_gate_schedules_and_kv_pruning_under_torchrun(tiny_flags, tmp_path) -> None:
    """V12 (delayed), V14 (KV pruning, delayed), V16 (variance-guided: the ranks decide on their
    mean losses, so at the same step) and V19 train under DDP and open their gates when the rule says."""
    flags = dict(
        _flags(tiny_flags, tmp_path / "abl"),
        architecture="unified-ra",
        max_iters=6,
        gate_delay_steps=2,
        gate_variance_start=2,
        gate_variance_every=2,
        gate_variance_window=2,
        gate_variance_threshold=1e9,
        gate_ramp_steps=2,
    )
    flags.pop("checkpoint_interval")
    for step in ("V12", "V14", "V16", "V19"):  # (an ablation is not run under torchrun: each step is)
        _torchrun(dict(flags, ra_step=step, output_dir=str(tmp_path / "abl" / step)))
        results = json.loads((tmp_path / "abl" / step / "results.json").read_text())
        assert results["stop_reason"] == "max_iters", step
    for step, opened in (("V12", 2), ("V14", 2), ("V16", 2)):
        results = json.loads((tmp_path / "abl" / step / "results.json").read_text())
        assert results["gates_opened_at"] == opened, step


def test_ddp_resume_restores_each_ranks_dropout_stream(tiny_flags, tmp_path) -> None:
    """With dropout, a resumed 2-rank run ends with the uninterrupted run's weights: every rank
    gets its own RNG state back (not rank 0's copied to all)."""
    flags = dict(_flags(tiny_flags, tmp_path / "full"), dropout=0.1, max_iters=6, checkpoint_interval=3)
    _torchrun(dict(flags, keep_checkpoints=2))
    mid = tmp_path / "full" / checkpoint.step_name(3)
    assert len(checkpoint.load(mid)["rng_ranks"]) == 2
    _torchrun(dict(flags, output_dir=str(tmp_path / "resumed"), resume=str(mid)))
    a = checkpoint.load(tmp_path / "full" / checkpoint.LAST)["model"]
    b = checkpoint.load(tmp_path / "resumed" / checkpoint.LAST)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` (a child of ``parent`` with RANK=rank), once it exists."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tiny_flags, tmp_path) -> None:
    """SIGTERM reaching rank 1 alone: all ranks stop together, rank 0 writes the checkpoint."""
    out = tmp_path / "out"
    flags = dict(_flags(tiny_flags, out), max_iters=100000, save_checkpoint=False, log_interval=1)
    port = str(_free_port())
    cmd = [*TORCHRUN, "--nproc_per_node=2", "--master_port", port, "gpt2/train.py", *as_argv(flags)]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=pipe, stderr=pipe, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stop_reason"] == "signal on another rank"  # rank 0 writes results.json
    assert checkpoint.load(out / checkpoint.LAST)["step"] == results["iters"] > 0
