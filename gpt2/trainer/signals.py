"""SIGTERM and SIGINT during training: remember the signal, let the loop stop at a step boundary."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class StopRequest:
    """The first stop signal received (None: none yet)."""

    signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "on another rank"


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM/SIGINT set the yielded request instead of killing the process."""
    request = StopRequest()

    def handler(signum: int, _frame: Any) -> None:
        request.signum = signum

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
