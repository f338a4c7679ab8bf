"""The training loop's own state: counters and clocks that a resumed run must continue from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
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
    train_time: float = 0.0  # seconds spent training, summed over resumed segments
    eval_time: float = 0.0  # seconds of it spent evaluating
    lr_scale: float = 1.0  # halved at each self-healing restart after non-finite steps
    bad_steps: int = 0  # non-finite steps skipped, over the whole run
    consecutive_bad: int = 0
    restarts: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                kind = type(getattr(self, f.name))
                setattr(self, f.name, kind(state[f.name]))
