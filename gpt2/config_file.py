"""Experiment files: a run's settings as TOML, read with ``tomllib`` and written with ``tomli_w``.

Sections are the config sections (``[model]``, ``[optim]``, ... as in :data:`gpt2.config.SECTIONS`),
keys are the flag names without ``--`` (``learning-rate = 6e-4``; ``learning_rate`` is accepted
too). Every run writes its resolved settings as ``config.toml``, with ``[run] given`` listing
the settings that were inputs (given on the command line or in a file); reading such a file
resolves those inputs again, plus any value edited since, so ``--config <run>/config.toml``
builds the same configuration, and a flag given after it re-derives what depends on it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gpt2.config import SECTIONS, RunConfig, field_kinds, field_parsers, flatten, repeated_fields, resolve
from gpt2.errors import ConfigError
from gpt2.track.metrics import write_text_atomic

CONFIG_TOML = "config.toml"  # what every run writes into its output directory
RUN_META = "run"  # the section that records which settings were inputs
NOT_WRITTEN = ("dry_run", "list_steps", "list_experiments", "config")  # modes of the command, not settings


def _typed(path: Path, where: str, value: Any, kind: type) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{path}: {where} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if kind is float else value


def read(path: str | Path) -> tuple[dict[str, Any], list[str] | None]:
    """The settings of a TOML file as ``field -> value``, and its ``[run] given`` list (None if absent).

    An unreadable file, an unknown section or key, or a value of the wrong type is a
    :class:`ConfigError` naming the file and the key.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    kinds, repeat = field_kinds(), repeated_fields()
    values: dict[str, Any] = {}
    given = None
    for sec, table in data.items():
        if sec == RUN_META and isinstance(table, dict):
            given = [str(g) for g in table.get("given", [])]
            continue
        if sec not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{sec}]; sections are {', '.join(SECTIONS)}")
        for key, value in table.items():
            name = key.replace("-", "_")
            where = f"[{sec}] {key}"
            if name not in kinds or name in NOT_WRITTEN:
                raise ConfigError(f"{path}: unknown key {where}")
            home, kind = kinds[name]
            if home != sec:
                raise ConfigError(f"{path}: {where} belongs in [{home}]")
            if name in repeat and isinstance(value, list):  # ablate = ["a=1,2", "b=3,4"]: two axes
                if not value:
                    raise ConfigError(f"{path}: {where} is an empty list: give at least one KEY=V1,V2")
                value = "; ".join(_typed(path, where, v, kind) for v in value)
            parse = field_parsers().get(name)
            if parse is not None and isinstance(value, str):  # e.g. ablation-seeds = "auto"
                try:
                    value = parse(value)
                except ValueError:
                    raise ConfigError(f"{path}: {where}: {value!r} is not a valid value") from None
            values[name] = _typed(path, where, value, kind)
    return values, given


def resolve_with_file(path: str | Path, overrides: dict[str, Any]) -> RunConfig:
    """The configuration of ``path`` with ``overrides`` (command-line flags) on top.

    A file that a run wrote (with ``[run] given``) re-resolves its inputs, the overrides and any
    value that differs from what they resolve to; a hand-written file's keys are all inputs.
    """
    values, given = read(path)
    inputs = {k: v for k, v in values.items() if given is None or k in given}
    try:
        # what the file's own inputs resolve to; a value that differs was edited: it is an input too
        written = flatten(resolve(inputs, explicit=set(inputs), check=False))
        inputs |= {k: v for k, v in values.items() if k not in inputs and written.get(k) != v}
        inputs |= overrides  # last, so that what depends on a flag is derived from it again
        return resolve(inputs, explicit=set(inputs))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_toml(cfg: RunConfig) -> str:
    """The resolved settings as TOML (unset values left out), with ``[run] given``."""
    import tomli_w

    doc: dict[str, Any] = {
        RUN_META: {"given": sorted(n for n in cfg.explicit if n not in NOT_WRITTEN)},
    }
    kinds = field_kinds()
    for name, value in flatten(cfg).items():
        table = doc.setdefault(kinds[name][0], {})  # sections in their --help order
        if value is not None and name not in NOT_WRITTEN:
            table[name.replace("_", "-")] = value
    header = "# The resolved settings of this run; replay with: python gpt2/train.py --config <this file>\n"
    return header + tomli_w.dumps(doc)


def write(cfg: RunConfig, path: str | Path) -> Path:
    """Write :func:`to_toml` to ``path`` atomically."""
    return write_text_atomic(Path(path), to_toml(cfg))
