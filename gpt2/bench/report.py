"""The report: ``bench.md`` (the table, one row per case, with ratios to the first row and to the
reference from this run, then figures published from other machines, labelled) and ``bench.json``
(every row's figures), both rewritten whole after every case, so a run cut off keeps its rows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpt2.bench.cases import ANCHORS, PRESETS
from gpt2.bench.gemm import REPEATS
from gpt2.bench.machine import cpu_model

COLUMNS = (
    "case",
    "dtype",
    "ms/step",
    "tokens/s",
    "vs first",
    "vs reference",
    "GFLOP/s",
    "of GEMM ceiling",
    "MFU",
    "peak memory",
    "warm-up",
    "optimizer step",
    "optimizer state",
    "mask update",
)
LEGEND = (
    "vs first, vs reference: throughput ratios (higher is faster), from this run. `reference` is "
    "nanoGPT's computation (full logits, F.cross_entropy, foreach AdamW, glibc's default "
    "allocator) on the same model. GFLOP/s: (6N + 12LCT) FLOPs per token x tokens/s; of GEMM "
    "ceiling: that over this machine's matmul rate in the case's dtype. With --rounds, ms/step "
    "is the median round's, the range in brackets every round's."
)


def write(out: Path, preset: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """bench.json and bench.md in ``out``, rewritten whole (called after every case)."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table_md = f"Measured {when} on {_where(rows, settings)}.\n\n" + table(preset, rows, settings.get("gemm"))
    (out / "bench.json").write_text(
        json.dumps({"preset": preset, "measured": when, **settings, "rows": rows}, indent=2)
    )
    (out / "bench.md").write_text(table_md + "\n")


def _where(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The machine the first measured row ran on: the GPU, or the CPU with its threads and --isa."""
    measured = next((r for r in rows if "torch" in r), {})
    if measured.get("device_name") != "cpu":
        return f"{measured.get('device_name', '?')}, torch {measured.get('torch', '?')}"
    where = f"{cpu_model()} ({measured.get('threads', '?')} threads), torch {measured.get('torch', '?')}"
    if settings.get("isa", "native") != "native":
        where += (
            f", kernels limited to {settings['isa'].upper()} with --isa (ATen dispatch: "
            f"{measured.get('cpu_capability', '?')}; oneDNN and MKL likewise)"
        )
    return where


def table(preset: str, rows: list[dict[str, Any]], gemm: dict[str, Any] | None = None) -> str:
    """Markdown: this machine's GEMM ceiling, our rows with ratios to the first row and to the
    reference case (both from this run), then figures published from other machines, labelled."""
    measured = [r for r in rows if "ms_per_step" in r and not r.get("generation")]
    base = measured[0] if measured else None
    ref = next((r for r in measured if r["case"].partition(":")[0] == "reference"), None)
    lines = [f"Preset `{preset}`: {json.dumps(PRESETS[preset])}", ""]
    if gemm:
        ceilings = ", ".join(f"{k} {gemm[k]:,.0f} GFLOP/s" for k in ("float32", "bfloat16") if k in gemm)
        lines += [f"GEMM ceiling here ({gemm['n']}x{gemm['n']} matmul, best of {REPEATS}): {ceilings}.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | | skipped: {r['skipped']} |" + " |" * (len(COLUMNS) - 3))
        elif not r.get("generation"):
            lines.append(_row(r, base, ref, gemm))
    lines += [line for r in rows if r.get("generation") for line in ("", _generation(r))]
    lines += ["", LEGEND, "", "Published elsewhere (other machines: shown, never divided by):", ""]
    lines += [f"- {a.name}: {a.ms_per_step:.1f} ms/step, {a.peak_mib:,.0f} MiB peak" for a in ANCHORS[preset]]
    return "\n".join(lines)


def _row(r: dict[str, Any], base: dict[str, Any] | None, ref: dict[str, Any] | None, gemm: Any) -> str:
    """One measured case's table row (``base``: the first measured row, ``ref``: the reference's)."""
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


def _generation(r: dict[str, Any]) -> str:
    """The generation case's line below the table: KV cache against recomputing the context."""
    return (
        f"Generation, {r['new_tokens']} new tokens from one (batch 1, greedy, block {r['block_size']}): "
        f"KV cache {r['cached']:,.0f} tokens/s, recomputing the context {r['uncached']:,.0f} tokens/s, "
        f"{r['cached'] / r['uncached']:.2f}x; within the block ({r['new_tokens_in_block']} tokens): "
        f"{r['cached_in_block']:,.0f} against {r['uncached_in_block']:,.0f} tokens/s, "
        f"{r['cached_in_block'] / r['uncached_in_block']:.2f}x (past the block the window slides and "
        f"every position moves, so each token is recomputed either way); the same tokens: "
        f"{'yes' if r['same_tokens'] else 'NO'}."
    )
