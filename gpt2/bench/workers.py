"""The measurements, each made inside one worker process (``python -m gpt2.bench --worker CASE``,
so peak memory and warm-up are measured cleanly): the real training step, nanoGPT's computation
(the ``reference`` every ratio is taken to) and generation. A case's ``measure`` names one of
:data:`MEASURES`."""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from gpt2.bench.cases import CASES, case_values
from gpt2.bench.machine import machine_fields, synchronizer

GENERATE_TOKENS = 200


class Timing(NamedTuple):
    """``steps`` timed steps after ``warmup`` untimed ones; ``profile``: a folder, or None."""

    steps: int
    warmup: int
    profile: Path | None = None


def run_worker(
    preset: str,
    case: str,
    steps: int,
    warmup: int,
    device: str,
    extra: dict[str, Any],
    profile: Path | None = None,
) -> dict[str, Any]:
    """Measure one case (``NAME`` or ``NAME:DTYPE``) in this process; returns its row.

    ``profile``: a folder; after the timing, a few steps run under the PyTorch profiler and
    their operator table (and a Chrome trace) are written there.
    """
    row = CASES[case.partition(":")[0]]
    os.environ.update(row.env)  # this worker process only; read when the kernels first load
    measure = MEASURES[row.measure]
    return measure(case, case_values(preset, case, extra, device), Timing(steps, warmup, profile))


def _timed(step: Callable[[], Any], n: int, sync: Callable[[], Any]) -> tuple[list[float], Any]:
    """``n`` calls of ``step``, each waited for: their durations (s) and the last call's result."""
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t)
    return times, out


# --- the training step ----------------------------------------------------------------------


def measure_step(case: str, values: dict[str, Any], timing: Timing) -> dict[str, Any]:
    """The real training step (:class:`gpt2.trainer.step.TrainStep`, built by the real
    :class:`~gpt2.trainer.loop.Trainer`) on random tokens; warm-up includes building the trainer."""
    from gpt2.config import resolve
    from gpt2.errors import ConfigError
    from gpt2.trainer.loop import Trainer
    from gpt2.trainer.run import extensions_for

    try:  # a case this machine cannot run (e.g. a CUDA-only kernel on CPU) is a row saying why
        cfg = resolve(values)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, extensions_for(cfg))
    except ConfigError as e:
        return {"case": case, "skipped": str(e)}
    sync = synchronizer(trainer.device)
    next_batch = _random_batches(trainer, cfg.data.batch_size)

    def step() -> Any:
        return trainer.step_fn(next_batch, cfg.optim.learning_rate)

    for _ in range(timing.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    mask_update_ms = _mask_update_ms(trainer, sync)
    times, last = _timed(step, timing.steps, sync)
    optimizer_ms = _optimizer_ms(trainer, step, min(timing.steps, 10), sync)
    if timing.profile is not None:
        _profile(timing.profile, case, step, sync, cuda=trainer.device.type == "cuda")
    figures = dict(warmup_s=warmup_s, optimizer_ms=optimizer_ms, mask_update_ms=mask_update_ms)
    return _step_row(case, cfg, trainer, times, float(last.loss), figures)


def _random_batches(trainer: Any, batch_size: int) -> Callable[[], Any]:
    """The next (inputs, targets) of 4 random batches in turn: contiguous on the trainer's device,
    as the data loader hands them over."""
    import torch

    g = trainer.gpt_config
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        b = torch.randint(0, g.vocab_size, (batch_size, g.block_size + 1), generator=gen)
        batches.append((b[:, :-1].contiguous().to(trainer.device), b[:, 1:].contiguous().to(trainer.device)))
    turns = itertools.cycle(batches)
    return lambda: next(turns)


def _mask_update_ms(trainer: Any, sync: Callable[[], Any]) -> float | None:
    """Pruning cases are timed in their steady state, with the masks at the target sparsity; the
    one mask update that gets them there is timed here, on its own (None: no pruning)."""
    ms = None
    for ext in trainer.extensions:
        schedule = getattr(ext, "schedule", None)
        if schedule is not None:
            t = time.perf_counter()
            ext.on_step_end(schedule.ramp_end + 1, trainer.model, trainer.optimizer)  # iteration ramp_end
            sync()
            ms = 1000 * (time.perf_counter() - t)
    return ms


def _optimizer_ms(trainer: Any, step: Callable[[], Any], n: int, sync: Callable[[], Any]) -> float:
    """The optimizer step alone over ``n`` training steps (median, ms): synchronised around it, so
    in a phase of its own, after the step timing."""
    optimizer_step, times = trainer.optimizer.step, []

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        sync()
        t = time.perf_counter()
        out = optimizer_step(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t)
        return out

    trainer.optimizer.step = timed_step
    for _ in range(n):
        step()
    trainer.optimizer.step = optimizer_step
    return 1000 * statistics.median(times)


def _step_row(
    case: str, cfg: Any, trainer: Any, times: list[float], loss: float, figures: dict[str, Any]
) -> dict[str, Any]:
    """A training-step case's row: step times (s) and the figures measured around them."""
    from gpt2.runtime import peak_memory_bytes
    from gpt2.track.perf import flops_per_token, mfu
    from gpt2.trainer.extensions.pruning import optimizer_state_bytes

    g, ms = trainer.gpt_config, 1000 * statistics.median(times)
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
        "warmup_s": figures["warmup_s"],
        "optimizer_ms": figures["optimizer_ms"],
        "optimizer_state_bytes_per_param": optimizer_state_bytes(trainer.optimizer) / n_all,
        "mask_update_ms": figures["mask_update_ms"],
        "pruning_frequency": cfg.pruning.pruning_frequency,
        "final_loss": loss,
        "n_params": trainer.n_params,
        "flops_per_token": flops_per_token(g, trainer.n_params),
        "tokens_per_step": tokens,
        "dtype": str(trainer.dtype).replace("torch.", ""),
        "device": str(trainer.device),
        **machine_fields(trainer.device),
    }


def _profile(folder: Path, case: str, step: Callable[[], Any], sync: Callable[[], Any], cuda: bool) -> None:
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


# --- the reference: nanoGPT's computation ---------------------------------------------------


def measure_reference(case: str, values: dict[str, Any], timing: Timing) -> dict[str, Any]:
    """What nanoGPT's train.py computes per step, on the preset's model, timed like the other cases.

    The same GPT-2 (its blocks), but the whole (B, T, vocab) logits and ``F.cross_entropy``, AdamW
    with its default implementation (nanoGPT asks for fused on CUDA only), global-norm clipping
    at 1.0, bf16 autocast where the preset asks for it, and glibc's allocator left as it is: this
    process never calls :func:`gpt2.runtime.configure_process`.
    """

    from gpt2.config import resolve
    from gpt2.runtime import resolve_device, resolve_dtype

    cfg = resolve(values)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    step, model = _reference_step(cfg, device, dtype)
    sync = synchronizer(device)
    t0 = time.perf_counter()
    for _ in range(timing.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times, loss = _timed(step, timing.steps, sync)
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return _reference_row(case, cfg, times, float(loss), warmup_s, n_params, device, dtype)


def _reference_step(cfg: Any, device: Any, dtype: Any) -> tuple[Callable[[], Any], Any]:
    """nanoGPT's step on one random batch (returns the loss), and the model it trains."""
    import torch
    import torch.nn.functional as F

    from gpt2.model import GPT

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

    return step, model


def _reference_row(
    case: str,
    cfg: Any,
    times: list[float],
    loss: float,
    warmup_s: float,
    n_params: int,
    device: Any,
    dtype: Any,
) -> dict[str, Any]:
    """The reference's row: the training-step row's fields that nanoGPT's computation has."""
    from gpt2.runtime import peak_memory_bytes
    from gpt2.track.perf import flops_per_token

    g, ms = cfg.gpt_config(), 1000 * statistics.median(times)
    tokens = cfg.data.batch_size * g.block_size
    return {
        "case": case,
        "ms_per_step": ms,
        "ms_per_step_mean": 1000 * statistics.fmean(times),
        "tokens_per_s": tokens / (ms / 1000),
        "peak_memory_bytes": peak_memory_bytes(device),
        "warmup_s": warmup_s,
        "final_loss": loss,
        "n_params": n_params,
        "flops_per_token": flops_per_token(g, n_params),
        "tokens_per_step": tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        **machine_fields(device),
    }


# --- generation -----------------------------------------------------------------------------


def measure_generation(case: str, values: dict[str, Any], timing: Timing) -> dict[str, Any]:
    """Greedy generation of GENERATE_TOKENS tokens from a one-token prompt on the preset's model,
    with the KV cache and without (the whole context recomputed per token): tokens/s of each, and
    the same again within the block (past it the window slides)."""
    import torch

    from gpt2.config import resolve
    from gpt2.model import GPT
    from gpt2.runtime import configure_process, resolve_device

    cfg = resolve(values)
    configure_process()
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    model = GPT(cfg.gpt_config()).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    sync = synchronizer(device)
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
    return out | machine_fields(device)


# How each case's ``measure`` is made (see :class:`gpt2.bench.cases.Case`).
MEASURES: dict[str, Callable[[str, dict[str, Any], Timing], dict[str, Any]]] = {
    "step": measure_step,
    "reference": measure_reference,
    "generate": measure_generation,
}
