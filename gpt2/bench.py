"""Training-step benchmark: ``python -m gpt2.bench [--preset tiny] [--cases vanilla,...]``.

Times the real training step (:class:`gpt2.trainer.step.TrainStep`, built by the real
:class:`~gpt2.trainer.loop.Trainer`) on random tokens, one fresh process per case so peak
memory and warm-up are measured cleanly, and reports each case as a ratio to the first and to
the ``reference`` case: what nanoGPT computes (the plain model, full logits, ``F.cross_entropy``,
foreach AdamW, glibc's default allocator), timed in the same call on the same machine. So every
ratio comes from one run; figures published from other machines are shown, labelled, never
divided by. The call also measures this machine's GEMM ceiling (fp32, and bf16 where it is
native) and reports each case's achieved FLOP rate as a fraction of it.
Writes ``bench.json`` and ``bench.md`` to ``--out`` (default ``$OUT`` or ``./bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/bench.py
    import _as_script  # noqa: F401

# Workloads: RunConfig overrides, exactly the configurations in which nanoGPT's figures below
# were measured, so the ratio compares the same work. nanoGPT ran unchanged but for the shape and
# batch, so with its own defaults: no biases and no dropout (our GPT-2 preset trains with both,
# as the earlier system did; the ``vanilla-ref`` case times that); one micro-batch per step.
AS_MEASURED: dict[str, Any] = dict(bias=False, dropout=0.0, gradient_accumulation=1, optimizer="adamw")
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_name="tiny", block_size=64, batch_size=8, dtype="float32", **AS_MEASURED),
    "gpt2-cpu": dict(model_name="gpt2", block_size=256, batch_size=4, dtype="float32", **AS_MEASURED),
    "gpt2-gpu": dict(
        model_name="gpt2", block_size=1024, batch_size=16, dtype="bfloat16", compile=True, **AS_MEASURED
    ),
}


class Anchor(NamedTuple):
    """A published figure for a preset's workload, printed above our rows (from the issues)."""

    name: str
    ms_per_step: float
    peak_mib: float
    warmup_s: float | None = None
    mfu: float | None = None


# The first anchor of each preset is nanoGPT (commit 3adf61e), the "vs nanoGPT" column's reference.
ANCHORS: dict[str, list[Anchor]] = {
    "tiny": [Anchor("nanoGPT (2 AMD EPYC cores, fp32)", 308.0, 860)],
    "gpt2-cpu": [Anchor("nanoGPT (2 AMD EPYC cores, fp32)", 5850.0, 3.3 * 1024)],
    "gpt2-gpu": [
        Anchor("nanoGPT (H100, torch 2.11)", 35.9, 12.4e9 / 2**20, 28, 0.394),
        Anchor("earlier system V0 (H100)", 37.4, 12.4e9 / 2**20, 29, 0.379),
        Anchor("earlier system V1 (H100)", 40.1, 13.3e9 / 2**20, 145, 0.353),
    ],
}

# What each case changes on top of the preset: every architecture, V-series mechanism, optimizer
# and pruning method. A case whose capability is not built is skipped.
CASES: dict[str, dict[str, Any]] = {
    "reference": {},  # nanoGPT's computation on the preset's model (see _reference_worker)
    "generate": {},  # 200 new tokens with and without the KV cache (a line below the table)
    "vanilla": {},
    "vanilla-ref": dict(bias=True, dropout=0.1),  # the GPT-2 preset's (and earlier system's) defaults
    "vanilla-cudnn": dict(sdpa_backend="cudnn"),  # cuDNN attention instead of PyTorch's flash-first order
    "V0": dict(architecture="unified-ra", ra_step="V0"),
    "V1": dict(architecture="unified-ra", ra_step="V1"),
    "V2": dict(architecture="unified-ra", ra_step="V2"),  # + self-restart
    "V3": dict(architecture="unified-ra", ra_step="V3"),  # + R-MLP
    "V6": dict(architecture="unified-ra", ra_step="V6"),  # every mechanism
    "V1-cudnn": dict(architecture="unified-ra", ra_step="V1", sdpa_backend="cudnn"),
    "V12": dict(architecture="unified-ra", ra_step="V12"),  # + a gate schedule (frozen gates)
    "V14": dict(architecture="unified-ra", ra_step="V14"),  # KV pruning, masked scores
    "V14-gather": dict(architecture="unified-ra", ra_step="V14", kv_gather=True),  # ... gathered keys
    "V15": dict(architecture="unified-ra", ra_step="V15"),  # learned keep ratio
    "V19": dict(architecture="unified-ra", ra_step="V19"),  # V-only pruning
    "C3": dict(architecture="unified-ra", ra_step="C3"),  # + V compressed to 8 dims
    "muon": dict(optimizer="muon"),  # Muon on the blocks' matrices, AdamW on the rest
    "adamwspam": dict(optimizer="adamwspam"),  # the command line's defaults: resets, no clipping
    "adamwspam-clip": dict(optimizer="adamwspam", spam_enable_clip=True),
    "bitter7": dict(optimizer="adamwprune", adamwprune_variant="bitter7", pruning_method="state"),
    "magnitude": dict(pruning_method="magnitude"),
    "movement": dict(pruning_method="movement"),
}
# ``--cases core``: the rows the GPU issue's targets are stated for.
CORE = ("reference", "vanilla", "V0", "V1", "adamwspam", "bitter7", "vanilla-cudnn")


def _worker(
    preset: str,
    case: str,
    steps: int,
    warmup: int,
    device: str,
    extra: dict[str, Any],
    profile: Path | None = None,
) -> dict[str, Any]:
    """Measure one case in this process; returns its figures.

    ``profile``: a folder; after the timing, a few steps run under the PyTorch profiler and
    their operator table (and a Chrome trace) are written there.
    """
    import torch

    from gpt2.config import resolve
    from gpt2.errors import ConfigError
    from gpt2.runtime import peak_memory_bytes
    from gpt2.track.perf import flops_per_token, mfu
    from gpt2.trainer.extensions.pruning import optimizer_state_bytes
    from gpt2.trainer.loop import Trainer
    from gpt2.trainer.run import extensions_for

    name, _, dtype = case.partition(":")
    values = {**PRESETS[preset], **CASES[name], **extra, "device": device, "quiet": True}
    if dtype:
        values["dtype"] = dtype
    if name == "reference":
        return _reference_worker(case, resolve(values), steps, warmup)
    if name == "generate":
        return _generate_worker(case, resolve(values))
    try:  # a case this machine cannot run (e.g. a CUDA-only kernel on CPU) is a row saying why
        cfg = resolve(values)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, extensions_for(cfg))
    except ConfigError as e:
        return {"case": case, "skipped": str(e)}
    g = trainer.gpt_config
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):  # contiguous inputs and targets, as the data loader hands them over
        b = torch.randint(0, g.vocab_size, (cfg.data.batch_size, g.block_size + 1), generator=gen)
        batches.append((b[:, :-1].contiguous().to(trainer.device), b[:, 1:].contiguous().to(trainer.device)))
    i = 0

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal i
        i += 1
        return batches[(i - 1) % len(batches)]

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
            ext.on_step_end(schedule.ramp_end + 1, trainer.model, trainer.optimizer)  # iteration ramp_end
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
    if profile is not None:
        step = lambda: trainer.step_fn(next_batch, cfg.optim.learning_rate)
        _profile(profile, case, step, sync, cuda=trainer.device.type == "cuda")
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
        "pruning_frequency": cfg.pruning.pruning_frequency,
        "final_loss": float(loss),
        "n_params": trainer.n_params,
        "flops_per_token": flops_per_token(g, trainer.n_params),
        "tokens_per_step": tokens,
        "dtype": str(trainer.dtype).replace("torch.", ""),
        "device": str(trainer.device),
        **_machine(trainer.device),
    }


def _reference_worker(case: str, cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    """What nanoGPT's train.py computes per step, on the preset's model, timed like the other cases.

    The same GPT-2 (its blocks), but the whole (B, T, vocab) logits and ``F.cross_entropy``, AdamW
    with its default implementation (nanoGPT asks for fused on CUDA only), global-norm clipping
    at 1.0, bf16 autocast where the preset asks for it, and glibc's allocator left as it is: this
    process never calls :func:`gpt2.runtime.configure_process`.
    """
    import torch
    import torch.nn.functional as F

    from gpt2.model import GPT
    from gpt2.runtime import peak_memory_bytes, resolve_device, resolve_dtype
    from gpt2.track.perf import flops_per_token

    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    torch.manual_seed(0)
    model = GPT(cfg.gpt_config()).to(device)
    if cfg.model.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.learning_rate, weight_decay=0.1, fused=device.type == "cuda"
    )
    g = cfg.gpt_config()
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(0, g.vocab_size, (cfg.data.batch_size, g.block_size + 1), generator=gen).to(device)
    x, y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    use_autocast = dtype != torch.float32

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            logits = model.lm_head(model.hidden_states(x))
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    tokens = cfg.data.batch_size * g.block_size
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return {
        "case": case,
        "ms_per_step": ms,
        "ms_per_step_mean": 1000 * statistics.fmean(times),
        "tokens_per_s": tokens / (ms / 1000),
        "peak_memory_bytes": peak_memory_bytes(device),
        "warmup_s": warmup_s,
        "final_loss": float(loss),
        "n_params": n_params,
        "flops_per_token": flops_per_token(g, n_params),
        "tokens_per_step": tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        **_machine(device),
    }


GENERATE_TOKENS = 200


def _generate_worker(case: str, cfg: Any) -> dict[str, Any]:
    """Greedy generation of GENERATE_TOKENS tokens from a one-token prompt on the preset's model,
    with the KV cache and without (the whole context recomputed per token): tokens/s of each."""
    import torch

    from gpt2.model import GPT
    from gpt2.runtime import configure_process, resolve_device

    configure_process()
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    model = GPT(cfg.gpt_config()).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    block = cfg.gpt_config().block_size
    out: dict[str, Any] = {
        "case": case,
        "generation": True,
        "new_tokens": GENERATE_TOKENS,
        "block_size": block,
    }
    same = True
    for key, n in (("", GENERATE_TOKENS), ("_in_block", min(GENERATE_TOKENS, block - 1))):
        tokens = {}
        for cached in (True, False):
            model.generate(prompt, 8, temperature=0.0, use_cache=cached)  # warm-up
            sync()
            t = time.perf_counter()
            tokens[cached] = model.generate(prompt, n, temperature=0.0, use_cache=cached)[0].tolist()
            sync()
            out[("cached" if cached else "uncached") + key] = n / (time.perf_counter() - t)
        same &= tokens[True] == tokens[False]
        out["new_tokens" + key] = n
    out["same_tokens"] = same
    return out | _machine(device)


def _gemm_worker(device_name: str) -> dict[str, Any]:
    """This machine's matmul ceiling: the best of a few (n x n) @ (n x n) products, in GFLOP/s,
    for fp32 and, where bf16 is native (CUDA, AMX), bf16. Threads as the training cases use them."""
    import torch

    from gpt2.runtime import configure_process, cpu_has_native_bf16, resolve_device

    configure_process()
    device = resolve_device(device_name)
    n = 8192 if device.type == "cuda" else 2048
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" or cpu_has_native_bf16() else [])
    out: dict[str, Any] = {"case": "gemm", "n": n, "device": str(device)}
    for dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        best = float("inf")
        for _ in range(5):
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
        out[str(dt).replace("torch.", "")] = 2 * n**3 / best / 1e9
    return out


def _profile(folder: Path, case: str, step: Any, sync: Any, cuda: bool) -> None:
    """Profile 3 steps: ``profile_<case>.txt`` (operators by self time) and ``trace_<case>.json.gz``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            step()
        sync()
    name = case.replace(":", "-")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (folder / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=50))
    prof.export_chrome_trace(str(folder / f"trace_{name}.json.gz"))  # gzip: GPU traces run to 10s of MB


def _table(preset: str, rows: list[dict[str, Any]], gemm: dict[str, Any] | None = None) -> str:
    """Markdown: this machine's GEMM ceiling, our rows with ratios to the first row and to the
    reference case (both from this run), then figures published from other machines, labelled."""
    w = PRESETS[preset]
    measured = [r for r in rows if "ms_per_step" in r and not r.get("generation")]
    base = measured[0] if measured else None
    ref = next((r for r in measured if r["case"].partition(":")[0] == "reference"), None)
    lines = [f"Preset `{preset}`: {json.dumps(w)}", ""]
    if gemm:
        ceilings = ", ".join(f"{k} {gemm[k]:,.0f} GFLOP/s" for k in ("float32", "bfloat16") if k in gemm)
        lines += [f"GEMM ceiling here ({gemm['n']}x{gemm['n']} matmul, best of 5): {ceilings}.", ""]
    lines += [
        "| case | dtype | ms/step | tokens/s | vs first | vs reference | GFLOP/s | of GEMM ceiling | MFU "
        "| peak memory | warm-up | optimizer step | optimizer state | mask update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    generation = [r for r in rows if r.get("generation")]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | | skipped: {r['skipped']} |" + " |" * 11)
        elif not r.get("generation"):
            lines.append(_row(r, base, ref, gemm))
    for r in generation:
        lines += [
            "",
            f"Generation, {r['new_tokens']} new tokens from one (batch 1, greedy, block {r['block_size']}): "
            f"KV cache {r['cached']:,.0f} tokens/s, recomputing the context {r['uncached']:,.0f} tokens/s, "
            f"{r['cached'] / r['uncached']:.2f}x; within the block ({r['new_tokens_in_block']} tokens): "
            f"{r['cached_in_block']:,.0f} against {r['uncached_in_block']:,.0f} tokens/s, "
            f"{r['cached_in_block'] / r['uncached_in_block']:.2f}x (past the block the window slides and "
            f"every position moves, so each token is recomputed either way); the same tokens: "
            f"{'yes' if r['same_tokens'] else 'NO'}.",
        ]
    lines += [
        "",
        "vs first, vs reference: throughput ratios (higher is faster), from this run. `reference` is "
        "nanoGPT's computation (full logits, F.cross_entropy, foreach AdamW, glibc's default "
        "allocator) on the same model. GFLOP/s: (6N + 12LCT) FLOPs per token x tokens/s; of GEMM "
        "ceiling: that over this machine's matmul rate in the case's dtype. With --rounds, ms/step "
        "is the median round's, the range in brackets every round's.",
        "",
        "Published elsewhere (other machines: shown, never divided by):",
        "",
    ]
    for a in ANCHORS[preset]:
        lines.append(f"- {a.name}: {a.ms_per_step:.1f} ms/step, {a.peak_mib:,.0f} MiB peak")
    return "\n".join(lines)


def _row(r: dict[str, Any], base: dict[str, Any] | None, ref: dict[str, Any] | None, gemm: Any) -> str:
    ms = r["ms_per_step"]
    upd = "-"
    if r.get("mask_update_ms") is not None and base is not None:  # the step averaged over one period
        every = r["pruning_frequency"]
        averaged = (ms + r["mask_update_ms"] / every) / base["ms_per_step"]
        upd = f"{r['mask_update_ms']:.1f} ms; with one per {every} steps {averaged:.3f}x first's step"
    m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    spread = [v for v in r.get("round_ms", []) if v is not None]
    rounds = f" ({min(spread):.1f}-{max(spread):.1f})" if len(spread) > 1 else ""
    vs_ref = f"{ref['ms_per_step'] / ms:.3f}x" if ref else "-"
    rate = r["tokens_per_s"] * r["flops_per_token"] / 1e9 if r.get("flops_per_token") else None
    ceiling = (gemm or {}).get(r["dtype"])
    frac = f"{100 * rate / ceiling:.0f}%" if rate and ceiling else "-"
    opt = f"{r['optimizer_ms']:.2f} ms" if r.get("optimizer_ms") is not None else "-"
    state = r.get("optimizer_state_bytes_per_param")
    return (
        f"| {r['case']} | {r['dtype']} | {ms:.1f}{rounds} | {r['tokens_per_s']:,.0f} | "
        f"{base['ms_per_step'] / ms:.3f}x | {vs_ref} | {f'{rate:,.1f}' if rate else '-'} | {frac} | {m} | "
        f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB | {r['warmup_s']:.1f} s | {opt} | "
        f"{f'{state:.2f} B/param' if state is not None else '-'} | {upd} |"
    )


def _machine(device: Any) -> dict[str, Any]:
    """What every case's row records of where it ran."""
    import torch

    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def _cpu_info() -> tuple[str, set[str]] | None:
    """The CPU's model name and flags from /proc/cpuinfo (None where there is none)."""
    name, flags = "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "cpu":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return None
    return name, flags


ISA_FLAG = {"avx2": "avx2", "avx512": "avx512f"}  # the /proc/cpuinfo flag each --isa needs


def _cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter here (AVX2, AVX-512, AMX)."""
    info = _cpu_info()
    if info is None:
        import platform

        return platform.processor() or "cpu"
    name, flags = info
    have = [tag for f, tag in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")) if f in flags]
    return f"{name} [{', '.join(have) or 'no AVX2'}]"


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
        default="reference,vanilla",
        help=f"comma list of {', '.join(CASES)}; 'all', or 'core' ({', '.join(CORE)}); CASE:DTYPE "
        "(e.g. vanilla:bfloat16) overrides the preset's dtype for that case",
    )
    p.add_argument(
        "--case-timeout",
        type=float,
        default=None,
        help="seconds one case may take (its row then says so and the next case runs); default none",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole call: a case gets at most what is left, and cases left when it is "
        "spent get rows saying so (for a machine lent for a fixed time); default none",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20 on CPU tiny, 5 gpt2-cpu, 50 GPU)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 3; 10 with compile)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the case list this many times, interleaved (A B A B): each row is its median "
        "round, with the spread (use on noisy machines; CPU cases spread by up to 10%%)",
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
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile 3 steps of each case: profile_<case>.txt (operators by self time) and "
        "trace_<case>.json.gz (chrome://tracing, Perfetto) in --out",
    )
    p.add_argument(
        "--isa",
        choices=["native", "avx2", "avx512"],
        default="native",
        help="CPU: limit torch's kernels (ATen, oneDNN, MKL) to this instruction set in every case, "
        "to measure a CPU without AVX-512 (avx2) or without AMX (avx512) on this one",
    )
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

    out = Path(args.out)
    if args.worker == "gemm":
        print(json.dumps(_gemm_worker(args.device)))
        return 0
    if args.worker:
        profile = out if args.profile else None
        print(json.dumps(_worker(preset, args.worker, steps, warmup, args.device, extra, profile)))
        return 0

    groups = {"all": list(CASES), "core": list(CORE)}
    cases = groups.get(args.cases) or [c.strip() for c in args.cases.split(",") if c.strip()]
    from gpt2.config import DTYPES

    unknown = [
        c for c in cases if c.partition(":")[0] not in CASES or c.partition(":")[2] not in ("", *DTYPES)
    ]
    if unknown or not cases:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": steps, "warmup": warmup, "rounds": args.rounds, "extra": extra, "isa": args.isa}
    if args.isa != "native":
        from gpt2.runtime import CPU_ISA_ENV

        info = _cpu_info()
        if info is not None and ISA_FLAG[args.isa] not in info[1]:
            p.error(f"--isa {args.isa}: this CPU has no {args.isa.upper()} ({_cpu_model()})")
        os.environ.update(CPU_ISA_ENV[args.isa])  # inherited by every worker process
    worker_args = ["--preset", preset, "--steps", str(steps), "--warmup", str(warmup),
                   "--device", args.device, "--out", str(out.resolve()),
                   *(["--profile"] if args.profile else []),
                   *[a for s in args.set for a in ("--set", s)]]  # fmt: skip
    # SIGTERM (an outer `timeout`, a scheduler) unwinds like Ctrl-C, so the running worker is killed
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        _run_cases(
            cases, worker_args, out, preset, settings, args.rounds, args.case_timeout, args.time_budget
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print((out / "bench.md").read_text(), end="")
    return 0


def _run_cases(
    cases: list[str],
    worker_args: list[str],
    out: Path,
    preset: str,
    settings: dict[str, Any],
    rounds: int,
    case_timeout: float | None,
    time_budget: float | None,
) -> None:
    """Every case in its own worker process, ``rounds`` times interleaved (A B A B, so a drift in
    the machine hits every case); the table is rewritten after each, so a run cut off keeps its rows."""
    root = Path(__file__).resolve().parent.parent
    start = time.monotonic()
    runs: list[list[dict[str, Any]]] = [[] for _ in cases]  # per position in --cases, one per round
    for _ in range(rounds):
        for case, case_runs in zip(cases, runs, strict=True):
            left = None if time_budget is None else time_budget - (time.monotonic() - start)
            if left is not None and left <= 0:
                case_runs.append({"case": case, "skipped": f"not run: --time-budget {time_budget:g} s spent"})
            else:
                limit = min((t for t in (case_timeout, left) if t is not None), default=None)
                cmd = [sys.executable, "-m", "gpt2.bench", "--worker", case, *worker_args]
                case_runs.append(_run_case(case, cmd, root, limit))
            row = case_runs[-1]
            print(f"{case}: {row.get('ms_per_step', row.get('skipped'))}", file=sys.stderr, flush=True)
            _write(out, preset, [_median_round(r) for r in runs if r], settings)
    left = None if time_budget is None else time_budget - (time.monotonic() - start)
    if left is None or left > 0:  # the machine's GEMM ceiling, last (it takes a few seconds)
        device = worker_args[worker_args.index("--device") + 1]
        settings["gemm"] = _gemm_ceiling(root, device, min(120.0, left) if left else 120.0)
        _write(out, preset, [_median_round(r) for r in runs if r], settings)


def _gemm_ceiling(root: Path, device: str, timeout: float) -> dict[str, Any] | None:
    """The GEMM worker's figures (its own process, like a case), or None if it could not run."""
    cmd = [sys.executable, "-m", "gpt2.bench", "--worker", "gemm", "--device", device]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's row from its rounds: the round with the median step time (the lower of two
    middles), with every round's step time in ``round_ms``; the last row if none measured."""
    measured = sorted((r for r in runs if "ms_per_step" in r), key=lambda r: r["ms_per_step"])
    if not measured:
        return runs[-1]
    row = dict(measured[(len(measured) - 1) // 2])
    if len(runs) > 1:
        row["round_ms"] = [r.get("ms_per_step") for r in runs]
    return row


def _run_case(case: str, cmd: list[str], root: Path, timeout: float | None) -> dict[str, Any]:
    """One case's worker process (in its own process group, so a timeout also ends the compiler
    processes it started); its JSON row, or a row saying why there is none."""
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"case": case, "skipped": f"timed out after {timeout:g} s"}
    except BaseException:  # interrupted or terminated: the worker must not go on holding the device
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        return {"case": case, "skipped": f"failed: {stderr.strip().splitlines()[-1:]}"}
    return json.loads(stdout.strip().splitlines()[-1])


def _write(out: Path, preset: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """bench.json and bench.md, rewritten whole after every case."""
    measured = next((r for r in rows if "torch" in r), {})
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = f"{measured.get('device_name', '?')}, torch {measured.get('torch', '?')}"
    if measured.get("device_name") == "cpu":
        where = f"{_cpu_model()} ({measured.get('threads', '?')} threads), torch {measured.get('torch', '?')}"
        if settings.get("isa", "native") != "native":
            where += (
                f", kernels limited to {settings['isa'].upper()} with --isa (ATen dispatch: "
                f"{measured.get('cpu_capability', '?')}; oneDNN and MKL likewise)"
            )
    table = f"Measured {when} on {where}.\n\n" + _table(preset, rows, settings.get("gemm"))
    (out / "bench.json").write_text(
        json.dumps({"preset": preset, "measured": when, **settings, "rows": rows}, indent=2)
    )
    (out / "bench.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
