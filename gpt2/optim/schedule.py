"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    horizon: int,
    decay: bool = True,
    progress: float | None = None,
) -> float:
    """LR for 0-based optimizer ``step``.

    As the reference: linear warmup ``lr * step / warmup`` (so step 0 runs at LR 0), then
    cosine from ``lr`` at ``warmup`` down to ``min_lr`` at ``horizon``, and ``min_lr`` after.
    ``progress`` in [0, 1], when given, overrides the step-based decay position
    (time-budgeted runs decay by elapsed time).
    """
    if step < warmup:
        return lr * step / warmup
    if not decay:
        return lr
    if progress is None:
        if horizon <= warmup:
            return min_lr
        progress = (step - warmup) / (horizon - warmup)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
