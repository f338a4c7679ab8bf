"""The training loop's own state: counters and clocks that a resumed run must continue from."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    """Everything the loop counts, in one object. The RNG streams, the data position, the model
    and the optimizer are checkpoint parts of their own; the step budget comes from the config.

    ``state_dict`` keys are the field names; a checkpoint that lacks one (an older version)
    leaves that field at its default.
    """

    step: int = 0  # completed optimizer steps
    best_val_loss: float = math.inf
    train_time: float = 0.0  # seconds of training steps (what --max-time budgets), over all segments
    eval_time: float = 0.0  # seconds spent evaluating (not in train_time), comparison evaluations included
    compare_time: float = 0.0  # of which comparison evaluations (outside --eval-budget's cap)
    compile_time: float = 0.0  # seconds of the first, compiling step under --compile (not in train_time)
    checkpoint_time: float = 0.0  # seconds spent writing checkpoints (not in train_time)
    wall_time: float = 0.0  # seconds of the whole run so far, data preparation included
    lr_scale: float = 1.0  # halved at each self-healing restart after non-finite steps
    bad_steps: int = 0  # non-finite steps skipped, over the whole run
    consecutive_bad: int = 0
    restarts: int = 0
    # The latest complete evaluation, with its "step" (a signal may abandon one: it is redone).
    last_eval: dict[str, float] = field(default_factory=dict)
    last_compare: int = -1  # the step of the latest complete comparison evaluation

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"last_eval": {"step": state.get("step", -1)}, **state}  # older checkpoints: evaluated
        for f in fields(self):
            if f.name in state:
                kind = type(getattr(self, f.name))
                setattr(self, f.name, kind(state[f.name]))


class TrainClock:
    """Training time: wall time since ``start`` plus ``base``, less the blocks run under :meth:`paused`."""

    def __init__(self, base: float) -> None:
        self.base = base
        self._start = time.perf_counter()
        self._paused = 0.0

    def __call__(self) -> float:
        return self.base + time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[list[float]]:
        """Time in the block is not training time; the yielded list receives its seconds."""
        t0 = time.perf_counter()
        spent: list[float] = []
        try:
            yield spent
        finally:
            spent.append(time.perf_counter() - t0)
            self._paused += spent[0]
