"""Training-step benchmark: ``python -m gpt2.bench [--preset tiny] [--cases vanilla,...]``.

Times the real training step (:class:`gpt2.trainer.step.TrainStep`, built by the real
:class:`~gpt2.trainer.loop.Trainer`) on random tokens, one fresh process per case so peak
memory and warm-up are measured cleanly, and reports each case as a ratio to the first.
Writes ``bench.json`` and ``bench.md`` to ``--out`` (default ``$OUT`` or ``./bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python gpt2/bench.py`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

# Workloads: RunConfig overrides. The CPU ones are exactly the configurations in which
# nanoGPT's figures below were measured, so the ratio compares the same work.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_name="tiny", block_size=64, batch_size=8, gradient_accumulation=1, dtype="float32"),
    "gpt2-cpu": dict(
        model_name="gpt2", block_size=256, batch_size=4, gradient_accumulation=1, dtype="float32"
    ),
    "gpt2-gpu": dict(
        model_name="gpt2",
        block_size=1024,
        batch_size=16,
        gradient_accumulation=1,
        dtype="bfloat16",
        compile=True,
    ),
}
# nanoGPT (commit 3adf61e) on the same workload, as measured in the issues (ms per step).
NANOGPT_MS = {"tiny": 308.0, "gpt2-cpu": 5850.0, "gpt2-gpu": 35.9}

# What each case changes on top of the preset; a case whose capability is not built yet is skipped.
CASES: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "V0": dict(architecture="unified-ra", ra_step="V0"),
    "V1": dict(architecture="unified-ra", ra_step="V1"),
    "adamwspam": dict(optimizer="adamwspam"),
    "bitter7": dict(optimizer="adamwprune", adamwprune_variant="bitter7", pruning_method="state"),
    "movement": dict(pruning_method="movement"),
}


def _worker(
    preset: str, case: str, steps: int, warmup: int, device: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """Measure one case in this process; returns its figures."""
    import torch

    from gpt2.config import resolve
    from gpt2.errors import ConfigError
    from gpt2.runtime import peak_memory_bytes
    from gpt2.track.perf import mfu
    from gpt2.trainer.extensions.pruning import optimizer_state_bytes
    from gpt2.trainer.loop import Trainer
    from gpt2.trainer.run import extensions_for

    name, _, dtype = case.partition(":")
    values = {**PRESETS[preset], **CASES[name], **extra, "device": device, "quiet": True}
    if dtype:
        values["dtype"] = dtype
    try:
        cfg = resolve(values)
    except ConfigError as e:
        return {"case": case, "skipped": str(e)}
    t0 = time.perf_counter()
    trainer = Trainer(cfg, extensions_for(cfg))
    g = trainer.gpt_config
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, g.vocab_size, (cfg.data.batch_size, g.block_size + 1), generator=gen).to(
            trainer.device
        )
        for _ in range(4)
    ]
    i = 0

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal i
        b = batches[i % len(batches)]
        i += 1
        return b[:, :-1], b[:, 1:]

    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        loss = trainer.step_fn(next_batch, cfg.optim.learning_rate).loss
    sync()
    warmup_s = time.perf_counter() - t0
    # Pruning cases are timed in their steady state, with the masks at the target sparsity; the
    # one mask update that gets them there is timed on its own.
    mask_update_ms = None
    for ext in trainer.extensions:
        schedule = getattr(ext, "schedule", None)
        if schedule is not None:
            t = time.perf_counter()
            ext.on_step_end(schedule.ramp_end, trainer.model, trainer.optimizer)
            sync()
            mask_update_ms = 1000 * (time.perf_counter() - t)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = trainer.step_fn(next_batch, cfg.optim.learning_rate).loss
        sync()
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    # Then the optimizer step alone (synchronised around it, so in a separate phase).
    optimizer_step, opt_times = trainer.optimizer.step, []

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        sync()
        t = time.perf_counter()
        out = optimizer_step(*args, **kwargs)
        sync()
        opt_times.append(time.perf_counter() - t)
        return out

    trainer.optimizer.step = timed_step  # type: ignore[method-assign]
    for _ in range(min(steps, 10)):
        trainer.step_fn(next_batch, cfg.optim.learning_rate)
    trainer.optimizer.step = optimizer_step  # type: ignore[method-assign]
    n_all = sum(p.numel() for p in trainer.model.parameters())
    tokens = cfg.tokens_per_step
    tps = tokens / (ms / 1000)
    return {
        "case": case,
        "ms_per_step": ms,
        "ms_per_step_mean": 1000 * statistics.fmean(times),
        "tokens_per_s": tps,
        "mfu": mfu(tps, g, trainer.n_params, trainer.device),
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        "warmup_s": warmup_s,
        "optimizer_ms": 1000 * statistics.median(opt_times),
        "optimizer_state_bytes_per_param": optimizer_state_bytes(trainer.optimizer) / n_all,
        "mask_update_ms": mask_update_ms,
        "final_loss": float(loss),
        "n_params": trainer.n_params,
        "tokens_per_step": tokens,
        "dtype": str(trainer.dtype).replace("torch.", ""),
        "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _table(preset: str, rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if "ms_per_step" in r), None)
    lines = [
        f"Preset `{preset}`: {json.dumps(PRESETS[preset])}",
        "",
        "| case | dtype | ms/step | tokens/s | vs first | vs nanoGPT | MFU | peak memory | warm-up "
        "| optimizer step | optimizer state | mask update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        upd = r.get("mask_update_ms")
        extra = (
            f" {r['optimizer_ms']:.2f} ms | {r['optimizer_state_bytes_per_param']:.2f} B/param | "
            f"{'-' if upd is None else f'{upd:.1f} ms'} |"
        )
        ratio = base["ms_per_step"] / r["ms_per_step"]
        vs_nano = NANOGPT_MS[preset] / r["ms_per_step"]
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{ratio:.3f}x | "
            f"{vs_nano:.2f}x | {m} | {r['peak_memory_bytes'] / 2**20:,.0f} MiB | {r['warmup_s']:.1f} s |"
            + extra
        )
    lines.append("")
    lines.append(f"nanoGPT reference for this workload: {NANOGPT_MS[preset]} ms/step (published figure).")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, true, lists), else the bare string."""
    if raw == "":
        return True
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        choices=[*PRESETS, "auto"],
        default="auto",
        help="workload; auto = gpt2-gpu on CUDA, tiny on CPU",
    )
    p.add_argument(
        "--cases",
        default="vanilla",
        help=f"comma list of {', '.join(CASES)}, or 'all'; CASE:DTYPE (e.g. vanilla:bfloat16) "
        "overrides the preset's dtype for that case",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20 on CPU tiny, 5 gpt2-cpu, 50 GPU)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 3; 10 with compile)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every case, e.g. --set compile=true",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "bench"), help="folder for bench.json and bench.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    extra: dict[str, Any] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        extra[key.replace("-", "_")] = _parse_value(raw)

    preset = args.preset
    if preset == "auto":
        import torch

        preset = "gpt2-gpu" if torch.cuda.is_available() and args.device != "cpu" else "tiny"
    compiled = bool(PRESETS[preset].get("compile") or extra.get("compile"))
    steps = args.steps or {"tiny": 20, "gpt2-cpu": 5, "gpt2-gpu": 50}[preset]
    warmup = args.warmup if args.warmup is not None else (10 if compiled else 3)

    if args.worker:
        print(json.dumps(_worker(preset, args.worker, steps, warmup, args.device, extra)))
        return 0

    cases = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    from gpt2.config import DTYPES

    unknown = [
        c for c in cases if c.partition(":")[0] not in CASES or c.partition(":")[2] not in ("", *DTYPES)
    ]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = []
    for case in cases:
        cmd = [
            sys.executable,
            "-m",
            "gpt2.bench",
            "--preset",
            preset,
            "--worker",
            case,
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--device",
            args.device,
            *[a for s in args.set for a in ("--set", s)],
        ]
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append({"case": case, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{case}: {rows[-1].get('ms_per_step', rows[-1].get('skipped'))}", file=sys.stderr, flush=True)
    table = _table(preset, rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(
        json.dumps(
            {"preset": preset, "steps": steps, "warmup": warmup, "extra": extra, "rows": rows}, indent=2
        )
    )
    (out / "bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
