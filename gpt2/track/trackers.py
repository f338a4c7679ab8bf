"""Experiment trackers (wandb, trackio). A tracker that fails degrades to a warning, never stops training."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any


def default_project() -> str:
    """``<cwd name>-<8 hex of md5(cwd)>``, as the earlier system derived it."""
    cwd = str(Path.cwd())
    return f"{Path(cwd).name}-{hashlib.md5(cwd.encode()).hexdigest()[:8]}"


def default_run_name(optimizer: str) -> str:
    return f"gpt2_{optimizer}_{time.strftime('%Y%m%d_%H%M%S')}"


class _Backend:
    def __init__(self, name: str, module: Any, run: Any) -> None:
        self.name, self.module, self.run = name, module, run


class Trackers:
    """Fan-out to the configured trackers; a no-op when none is configured."""

    def __init__(
        self, names: list[str], *, project: str, run_name: str, config: dict[str, Any], out_dir: Path
    ):
        self.backends: list[_Backend] = []
        for name in names:
            if name == "none":
                continue
            try:
                self.backends.append(self._init(name, project, run_name, config, out_dir))
            except Exception as e:  # any failure of an optional tracker must not stop training
                self._warn(name, "could not start", e)

    @staticmethod
    def _init(name: str, project: str, run_name: str, config: dict[str, Any], out_dir: Path) -> _Backend:
        if name == "wandb":
            import wandb

            run = wandb.init(project=project, name=run_name, config=config, dir=str(out_dir), reinit=True)
            return _Backend(name, wandb, run)
        if name == "trackio":
            import trackio

            run = trackio.init(project=project, name=run_name, config=config)
            return _Backend(name, trackio, run)
        raise ValueError(f"unknown tracker {name!r}")

    @staticmethod
    def _warn(name: str, what: str, e: BaseException) -> None:
        print(f"warning: tracker {name}: {what}: {type(e).__name__}: {e}", file=sys.stderr)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for b in list(self.backends):
            try:
                if b.name == "wandb":
                    b.run.log(metrics, step=step)
                else:
                    b.module.log(metrics, step=step)
            except Exception as e:
                self._warn(b.name, "log failed, disabling it", e)
                self.backends.remove(b)

    def finish(self, summary: dict[str, Any]) -> None:
        for b in self.backends:
            try:
                if b.name == "wandb":
                    b.run.summary.update(summary)
                    b.run.finish()
                else:
                    b.module.finish()
            except Exception as e:
                self._warn(b.name, "finish failed", e)
        self.backends = []
