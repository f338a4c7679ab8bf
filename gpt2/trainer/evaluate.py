"""Evaluation: mean loss over fixed windows of each split, with its standard error across batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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
    """``{split}_loss`` and ``{split}_loss_se`` for ``splits``, and ``val_perplexity``; for data with
    answer positions (a synthetic task, ``data.answers``) also ``{split}_accuracy`` and its standard error:
    the share of answers whose most likely token is the target.

    ``samples`` batches per split per rank; the same windows every time, so successive
    evaluations are comparable. ``model`` is switched to eval mode and back; ``eval_model`` (the
    compiled one, where compiled) computes the losses. ``before_batch`` runs before each batch (the
    trainer's stop check: it may raise to abandon the evaluation). Standard errors are those of the
    mean over batches (every batch holds the same number of answers).
    """
    answers = getattr(data, "answers", False)
    model.eval()
    try:
        out: dict[str, float] = {}
        for split in splits:
            values = []
            for x, y in console.batches(data.eval_batches(split, samples), samples, f"eval {split}"):
                before_batch()
                with autocast(device, dtype):
                    values.append(_answer_metrics(eval_model, x, y) if answers else eval_model(x, y).float())
            # a copy: under CUDA graphs the next replay reuses the output's memory
            per_batch = torch.stack(values).reshape(len(values), -1).clone()
            names = ("loss", "accuracy") if answers else ("loss",)
            for name, column in zip(names, per_batch.unbind(1), strict=True):
                out[f"{split}_{name}"], out[f"{split}_{name}_se"] = _mean_and_se(column, dist)
    finally:
        model.train()
    out["val_perplexity"] = math.exp(min(out["val_loss"], 20.0))
    return out


def _answer_metrics(eval_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[loss, accuracy] over the answer positions (target != -1) of one batch, from its logits."""
    asked = y != -1
    logits = eval_model(x, logits_at=asked).float()
    target = y[asked]
    loss = F.cross_entropy(logits, target)
    return torch.stack([loss, (logits.argmax(dim=-1) == target).float().mean()])


def _mean_and_se(values: torch.Tensor, dist: distributed.DistInfo) -> tuple[float, float]:
    """Mean of per-batch ``values`` over every rank, and its standard error."""
    # sum, sum of squares and count over every rank's share of the fixed windows
    count = torch.tensor(float(len(values)), device=values.device)
    moments = distributed.all_reduce_mean(torch.stack([values.sum(), (values * values).sum(), count]), dist)
    total, total_sq, n = (float(v) for v in moments * dist.world_size)
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean, math.sqrt(var / n)


MC_BATCH = 32  # multiple-choice requests per forward pass (their logits are (32, length, vocab))


@torch.no_grad()
def multiple_choice(
    model: nn.Module,
    tasks: list[Any],
    *,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    dist: distributed.DistInfo,
    before_batch: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` (with standard errors) of each multiple-choice task, as
    ``mc_<task>_acc``, ...: every rank scores every world_size-th item and the counts are summed;
    every rank calls the model equally often (FSDP's collectives need it)."""
    from gpt2.tasks.multiple_choice import batch_count, metrics_from_counts, score

    def logits(idx: torch.Tensor) -> torch.Tensor:
        before_batch()
        with autocast(device, dtype):
            return model(idx)

    out: dict[str, float] = {}
    model.eval()
    try:
        for task in tasks:
            mine = list(range(dist.rank, len(task), dist.world_size))
            calls = distributed.max_over_ranks([batch_count(task, MC_BATCH, mine)], dist, device)[0]
            s = score(logits, task, block_size, MC_BATCH, mine, device, min_batches=int(calls))
            counts = torch.tensor([float(len(mine)), float(s.correct.sum()), float(s.correct_norm.sum())])
            n, right, right_norm = (
                float(v) for v in distributed.all_reduce_mean(counts.to(device), dist) * dist.world_size
            )
            out.update(
                {
                    f"mc_{task.name}_{k}": v
                    for k, v in metrics_from_counts(round(n), right, right_norm).items()
                }
            )
    finally:
        model.train()
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
