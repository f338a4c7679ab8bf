"""The steps since the last log line: losses and skip flags stay on the device until read."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class LogWindow:
    """Accumulates one log window of steps without host reads; :meth:`close` reads it once."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.loss = torch.zeros((), device=device)  # summed loss of the applied steps
        self._flags = torch.zeros(size, device=device)  # 1.0 applied, 0.0 skipped (non-finite)
        self.steps = 0
        self.seconds = 0.0  # training time in the window, evaluation and checkpoints excluded
        self._start = time.perf_counter()

    def add(self, loss: torch.Tensor, applied: torch.Tensor) -> None:
        self.steps += 1
        self.loss += torch.where(applied > 0, loss, 0.0)  # a skipped step's loss is left out
        self._flags[self.steps - 1] = applied

    def flags(self) -> list[float]:
        """The window's applied flags (the one host read of the window)."""
        return self._flags[: self.steps].tolist()

    def close(self) -> list[float]:
        """End the window's clock; returns its flags."""
        self.seconds += time.perf_counter() - self._start
        return self.flags()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.seconds, self._start = 0, 0.0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the block (evaluation, a checkpoint) is not training throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - t0
