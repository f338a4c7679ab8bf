"""Evaluation: mean loss over fixed windows of each split, with its standard error across batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gpt2.runtime import autocast
from gpt2.track.console import Console
from gpt2.trainer import distributed


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_model: nn.Module,
    data: Any,
    *,
    samples: int,
    device: torch.device,
    dtype: torch.dtype,
    dist: distributed.DistInfo,
    console: Console,
    before_batch: Callable[[], None] = lambda: None,
    splits: tuple[str, ...] = ("train", "val"),
) -> dict[str, float]:
    """``{split}_loss`` and ``{split}_loss_se`` for ``splits``, and ``val_perplexity``.

    ``samples`` batches per split per rank; the same windows every time, so successive
    evaluations are comparable. ``model`` is switched to eval mode and back; ``eval_model`` (the
    compiled one, where compiled) computes the losses. ``before_batch`` runs before each batch (the
    trainer's stop check: it may raise to abandon the evaluation).
    """
    model.eval()
    try:
        out: dict[str, float] = {}
        for split in splits:
            losses = []
            for x, y in console.batches(data.eval_batches(split, samples), samples, f"eval {split}"):
                before_batch()
                with autocast(device, dtype):
                    # a copy: under CUDA graphs the next replay reuses the output's memory
                    losses.append(eval_model(x, y).float().clone())
            t = torch.stack(losses)
            # sum, sum of squares and count over every rank's share of the fixed windows
            count = torch.tensor(float(len(losses)), device=t.device)
            moments = distributed.all_reduce_mean(torch.stack([t.sum(), (t * t).sum(), count]), dist)
            total, total_sq, n = (float(v) for v in moments * dist.world_size)
            mean = total / n
            var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
            out[f"{split}_loss"] = mean
            out[f"{split}_loss_se"] = math.sqrt(var / n)
    finally:
        model.train()
    out["val_perplexity"] = math.exp(min(out["val_loss"], 20.0))
    return out


COMPARE_FIRST_STEP = 16  # comparison evaluations at 16, 23, 32, 45, 64, 91, 128, ... steps (x sqrt 2)


def is_compare_step(step: int) -> bool:
    """Whether ``step`` is on the comparison grid: round(16 * 2^(k/2)) for k = 0, 1, 2, ...

    A geometric grid puts a handful of points at every scale of a budget that is not known in
    advance (a time budget), so any two runs have points around their common token count."""
    if step < COMPARE_FIRST_STEP:
        return False
    k = round(2 * math.log2(step / COMPARE_FIRST_STEP))
    return any(round(COMPARE_FIRST_STEP * 2 ** (j / 2)) == step for j in (k - 1, k, k + 1) if j >= 0)
