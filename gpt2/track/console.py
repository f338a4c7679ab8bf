"""What a run prints: a progress bar on a terminal, plain log lines otherwise, nothing when quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any


class Console:
    """Console output of one process; ``enabled`` is False on ranks other than 0 and with --quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def say(self, msg: str) -> None:
        """A line, above the progress bar while there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    @contextlib.contextmanager
    def progress(self, total: int, initial: int) -> Iterator[None]:
        """A step progress bar (a terminal only) for the duration of the block."""
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = None

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def batches(self, items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
        """``items``, with a transient bar on a terminal (evaluation)."""
        if not (self.enabled and sys.stderr.isatty()):
            return items
        from tqdm import tqdm

        return tqdm(items, total=total, desc=desc, leave=False)

    def log_line(self, r: dict[str, Any], max_iters: int) -> None:
        """A train log record: in the bar's postfix, or as a line."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{r['train_loss']:.3f}", tok_s=f"{r['tokens_per_s']:,.0f}", refresh=False
            )
            return
        self.say(
            f"step {r['step']:6d}/{max_iters} | loss {r['train_loss']:.4f} | lr {r['lr']:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s | {r['ms_per_step']:.1f} ms/step"
        )
