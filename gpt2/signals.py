"""SIGTERM and SIGINT, honoured in every phase of a command without tearing any state.

A scheduler sends SIGTERM and, 30 to 120 s later, SIGKILL; so a stop signal must end the
process within seconds wherever it lands, and leave nothing half-written. One handler for the
whole process, installed by the entry points (:func:`installed`), works in two modes:

- **cancellable** (the default, and evaluation, sampling, data preparation, the forward and
  backward passes of a training step): the signal raises :class:`Stopped` at once, within the
  running operation. What is abandoned there is discarded: a partial evaluation is never recorded,
  an abandoned step is rewound (see ``Trainer._step``), a half-prepared dataset never gets its
  completion marker.
- **deferred** (the training loop's bookkeeping, optimizer updates, checkpoint writes): the signal
  is only recorded; the loop reads it at its next check and stops there.

A second SIGINT exits at once (status 130) without saving, as a user pressing ^C twice expects.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


OUTSIDE_TRAINING = "before training started: nothing was trained, nothing saved"


class Stopped(BaseException):  # like KeyboardInterrupt: ``except Exception`` does not catch it
    """A stop signal ended a cancellable phase: the signal's name and where it landed (a phrase)."""

    def __init__(self, name: str, where: str = OUTSIDE_TRAINING) -> None:
        super().__init__(f"{name} {where}")
        self.name, self.where = name, where


class StopRequest:
    """The first stop signal received (None: none yet) and the mode it is handled in."""

    def __init__(self) -> None:
        self.signum: int | None = None
        # (deferred, where) per open block; the innermost decides
        self._modes: list[tuple[bool, str]] = [(False, OUTSIDE_TRAINING)]

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "on another rank"

    @property
    def deferred(self) -> bool:
        return self._modes[-1][0]

    def raise_if_stopped(self) -> None:
        if self.signum is not None:
            raise Stopped(self.name, self._modes[-1][1])

    @contextlib.contextmanager
    def mode(self, deferred: bool, where: str) -> Iterator[StopRequest]:
        """Within the block a signal is only recorded (``deferred``) or raises :class:`Stopped`
        saying ``where`` it landed. Entering a cancellable block after a signal raises at once."""
        depth = len(self._modes)
        try:  # (a signal may land anywhere in here: the stack is cut back to its depth, not popped)
            self._modes.append((deferred, where))
            if not deferred:
                self.raise_if_stopped()
            yield self
        finally:
            del self._modes[depth:]

    def deferring(self) -> contextlib.AbstractContextManager[StopRequest]:
        return self.mode(True, self._modes[-1][1])

    def cancellable(self, where: str = OUTSIDE_TRAINING) -> contextlib.AbstractContextManager[StopRequest]:
        return self.mode(False, where)

    def reset(self) -> None:
        """Forget the signal (tests; a process that goes on after handling a stop)."""
        self.signum = None

    def handle(self, signum: int, _frame: Any = None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                sys.stderr.write("second interrupt: exiting now, without saving\n")
                sys.stderr.flush()
                os._exit(130)
            return  # a repeated SIGTERM changes nothing: the stop is under way
        self.signum = signum
        if not self.deferred:
            self.raise_if_stopped()


STOP = StopRequest()  # the process's one stop state; the handler writes it, the phases read it
_depth = 0  # nesting of :func:`installed` blocks


@contextlib.contextmanager
def installed() -> Iterator[StopRequest]:
    """Within the block SIGTERM and SIGINT go to :data:`STOP` (main thread only).

    Blocks nest; the outermost restores the previous handlers and forgets the signal on leaving, so
    a trainer used as a library (a test) leaves its process as it found it.
    """
    global _depth
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if _depth == 0 else {}
    for s in previous:
        signal.signal(s, STOP.handle)
    _depth += 1
    try:
        yield STOP
    finally:
        _depth -= 1
        for s, h in previous.items():
            signal.signal(s, h)
        if _depth == 0:
            STOP.reset()


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """The training loop's scope: the handler installed, signals deferred within it."""
    with installed(), STOP.deferring():
        yield STOP
