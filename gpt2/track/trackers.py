"""Experiment trackers (wandb, trackio) behind one fan-out object.

A tracker is optional: one that is missing, cannot start, or raises while logging or finishing
costs one warning line on stderr and is then left alone; training never stops for it.

wandb never needs the network: ``WANDB_MODE`` is respected when set; when it is not and no API
key is configured (``WANDB_API_KEY`` or a netrc entry), the run is logged offline under
``<output_dir>/wandb`` (or ``$WANDB_DIR/wandb``), to upload later with ``wandb sync``; an online
start that fails or times out falls back to offline. trackio is always local (SQLite under
``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import netrc
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

KNOWN = ("wandb", "trackio")
WANDB_INIT_TIMEOUT_S = 30.0  # wandb's own default is 90 s; an unreachable server should not stall a run


def default_project() -> str:
    """``<cwd name>-<8 hex of md5(cwd)>``, as the earlier system derived it."""
    cwd = str(Path.cwd())
    return f"{Path(cwd).name}-{hashlib.md5(cwd.encode()).hexdigest()[:8]}"


def default_run_name(optimizer: str) -> str:
    return f"gpt2_{optimizer}_{time.strftime('%Y%m%d_%H%M%S')}"


def parse_tracker_names(spec: str | Sequence[str]) -> list[str]:
    """``"wandb,trackio"`` (or a list) -> ``["wandb", "trackio"]``; ``none`` and repeats dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if name and name != "none" and name not in names:
            names.append(name)
    return names


def flatten_scalars(values: Mapping[str, Any], *, keep_strings: bool = False) -> dict[str, Any]:
    """Numbers of ``values`` (nested dicts joined with ``/``); tensors and numpy scalars as Python
    numbers; ``None``, lists and other objects dropped (strings too unless ``keep_strings``)."""
    out: dict[str, Any] = {}

    def visit(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, sub in v.items():
                visit(f"{prefix}/{k}" if prefix else str(k), sub)
            return
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
            with contextlib.suppress(Exception):
                v = v.item()
        if isinstance(v, bool):
            out[prefix] = int(v)
        elif isinstance(v, (int, float)) or (keep_strings and isinstance(v, str)):
            out[prefix] = v

    visit("", values)
    return out


def _warn(name: str, what: str, e: BaseException | None = None) -> None:
    detail = f": {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}" if e else ""
    print(f"warning: tracker {name}: {what}{detail}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """trackio prints banners on stdout; swallow them under ``--quiet``."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _wandb_has_api_key() -> bool:
    """An API key in the environment or in netrc for the configured host (no network access)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _Backend:
    """One started tracker run: log a dict of numbers, finish with a summary."""

    name = ""
    location: str | None = None  # where its local files are, for the user

    def log(self, metrics: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        raise NotImplementedError


class _Wandb(_Backend):
    name = "wandb"

    def __init__(self, project: str, run_name: str, config: dict[str, Any], out_dir: Path, quiet: bool):
        import wandb

        # The environment is read here, at every start, rather than left to wandb, which reads it
        # once per process: a later run in the same process (ablation, tests) sees its current value.
        run_dir = os.environ.get("WANDB_DIR") or str(out_dir)  # default: next to metrics.jsonl
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or None
        if mode is None and not _wandb_has_api_key():
            mode = "offline"  # no account configured: log locally instead of prompting for a login
        settings: dict[str, Any] = {"reinit": "finish_previous"}
        if quiet:
            settings["silent"] = True
        if not os.environ.get("WANDB_INIT_TIMEOUT"):
            settings["init_timeout"] = WANDB_INIT_TIMEOUT_S
        kwargs: dict[str, Any] = {"project": project, "name": run_name, "config": config, "dir": run_dir}
        try:
            self.run = wandb.init(**kwargs, mode=mode, settings=wandb.Settings(**settings))
        except Exception as e:
            if mode in ("offline", "dryrun", "disabled"):
                raise
            _warn(self.name, "could not start online, logging offline instead", e)
            self.run = wandb.init(**kwargs, mode="offline", settings=wandb.Settings(**settings))
        if self.run is None or not hasattr(self.run, "log"):
            raise RuntimeError("wandb.init returned no run")
        with contextlib.suppress(Exception):
            self.location = str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish(exit_code=exit_code)


class _Trackio(_Backend):
    name = "trackio"

    def __init__(self, project: str, run_name: str, config: dict[str, Any], out_dir: Path, quiet: bool):
        import trackio

        wanted = os.environ.get("TRACKIO_DIR")
        actual = getattr(trackio, "TRACKIO_DIR", None)
        if wanted and actual is not None and Path(wanted).resolve() != Path(actual).resolve():
            # trackio reads TRACKIO_DIR once, at import
            _warn(self.name, f"TRACKIO_DIR changed after trackio was imported; logging to {actual}")
        self.module, self.quiet = trackio, quiet
        with _silenced(quiet):
            self.run = trackio.init(project=project, name=run_name, config=config)
        self.location = str(actual) if actual is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # trackio stores JSON; NaN/inf are not JSON, and a diverged value is recorded in metrics.jsonl anyway
        self.run.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        # trackio keeps no summary or exit status: the final values are in the log
        current = getattr(getattr(self.module, "context_vars", None), "current_run", None)
        with _silenced(self.quiet):
            if current is not None and current.get() is self.run:
                self.module.finish()  # also forgets the run: trackio's atexit hook won't finish it again
            else:
                self.run.finish()


_BACKENDS: dict[str, type[_Backend]] = {"wandb": _Wandb, "trackio": _Trackio}


class Trackers:
    """Fan-out to the configured trackers; a no-op when none is configured.

    ``names`` is a list or a comma string (``"wandb,trackio"``; ``"none"`` is nothing). Call
    :meth:`log` at log/eval steps and :meth:`finish` once at the end (idempotent; also done by
    ``with Trackers(...)`` on the way out, as a failed run when an exception leaves the block).
    Creating a new instance finishes any earlier one still open, so a run that crashed before
    its ``finish`` (an ablation step) does not leak its tracker runs into the next.
    """

    _open: ClassVar[list[Trackers]] = []

    def __init__(
        self,
        names: str | Sequence[str],
        *,
        project: str,
        run_name: str,
        config: dict[str, Any],
        out_dir: Path,
        quiet: bool = False,
    ) -> None:
        for previous in list(Trackers._open):
            previous.finish(exit_code=1)
        self.backends: list[_Backend] = []
        self._broken: list[_Backend] = []  # stopped logging after an error; still finished at the end
        self.finished = False
        for name in parse_tracker_names(names):
            if name not in _BACKENDS:
                _warn(name, f"unknown tracker (use none, {', '.join(KNOWN)} or a comma list); skipped")
                continue
            try:
                self.backends.append(_BACKENDS[name](project, run_name, config, Path(out_dir), quiet))
            except Exception as e:  # any failure of an optional tracker must not stop training
                _warn(name, "could not start, continuing without it", e)
        if self.backends:
            Trackers._open.append(self)

    @property
    def locations(self) -> dict[str, str]:
        """Tracker name -> where its local files are (the wandb run folder, the trackio dir)."""
        return {b.name: b.location for b in self.backends + self._broken if b.location}

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numbers of ``metrics`` (nested dicts flattened with ``/``) at optimizer step ``step``."""
        if not self.backends:
            return
        values = flatten_scalars(metrics)
        if not values:
            return
        for b in list(self.backends):
            try:
                b.log(values, step)
            except Exception as e:
                _warn(b.name, f"log failed at step {step}, no more logging to it", e)
                self.backends.remove(b)
                self._broken.append(b)

    def finish(self, summary: Mapping[str, Any] | None = None, *, exit_code: int = 0) -> None:
        """Write ``summary`` (numbers and strings; nested dicts flattened) and close every run.

        ``exit_code`` != 0 marks the run failed where the tracker knows the notion (wandb).
        Calling it again does nothing.
        """
        if self.finished:
            return
        self.finished = True
        values = flatten_scalars(summary or {}, keep_strings=True)
        for b in self.backends + self._broken:
            try:
                b.finish(values if b in self.backends else {}, exit_code)
            except Exception as e:
                _warn(b.name, "finish failed", e)
        self.backends, self._broken = [], []
        with contextlib.suppress(ValueError):
            Trackers._open.remove(self)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
