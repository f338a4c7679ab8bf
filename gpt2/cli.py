"""The command line of ``gpt2/train.py``, generated from the config dataclasses.

Bad input exits with status 2 and one line, before anything expensive is imported or built.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import MISSING, fields
from typing import Any, NoReturn

from gpt2.config import SECTIONS, RunConfig, resolve
from gpt2.errors import ConfigError

_SUPPRESS_DEFAULT = "(preset)"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _base_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """One argument group per config section, one flag per field."""
    parser = _OneLineParser(
        prog=prog,
        description="Train GPT-2 (vanilla or Unified RA) with controlled ablations and pruning optimizers.",
        epilog="Example (CPU, offline, minutes): python gpt2/train.py --model-name tiny --max-time 120",
        usage="%(prog)s [options]   (run from the repository root)",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach the namespace
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read settings from an experiment file (sections [model], [optim], ... as the groups below, "
        "keys as the flags without --); flags given here override it. Every run writes its own "
        "config.toml, which replays the run",
    )
    for cls in SECTIONS.values():
        group = parser.add_argument_group(cls.__doc__.strip().rstrip("."))
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            meta = f.metadata
            names = [_flag(f.name), *meta.get("aliases", ())]
            default = f.default if f.default is not MISSING else None
            shown = _SUPPRESS_DEFAULT if default is None else default
            kind = _base_type(hints[f.name])
            # help is plain text: argparse would read a % as a format directive
            help_text = meta["help"].replace("%", "%%") + (
                "" if default is not None else " [default: preset]"
            )
            if kind is bool:
                if default:
                    group.add_argument(
                        *names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
                    )
                else:
                    group.add_argument(*names, dest=f.name, action="store_true", help=help_text)
                continue
            if meta.get("repeat"):  # several axes: joined with ';' into the one field
                group.add_argument(
                    *names, dest=f.name, action="append", metavar=meta.get("metavar"), help=meta["help"]
                )
                continue
            group.add_argument(
                *names,
                dest=f.name,
                type=meta.get("parse", kind),
                choices=meta.get("choices"),
                metavar=meta.get("metavar"),
                help=help_text if default is None else help_text + f" [default: {shown}]",
            )
    return parser


def parse(argv: list[str] | None = None, prog: str = "train.py") -> RunConfig:
    """Parse and validate; on bad input print one line and exit with status 2."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    values = vars(ns)
    config_path = values.pop("config", None)
    for name, value in values.items():
        if isinstance(value, list):  # a repeated flag (--ablate)
            values[name] = "; ".join(value)
    try:
        if config_path is not None:
            from gpt2.config_file import resolve_with_file

            cfg = resolve_with_file(config_path, values)
        else:
            cfg = resolve(values, explicit=set(values))
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        for line in cfg.warnings:
            print(f"{prog}: warning: {line}", file=sys.stderr)
    return cfg


def main_guard(fn: Any, *args: Any) -> int:
    """Run ``fn`` with SIGTERM/SIGINT handled (see :mod:`gpt2.signals`); a
    :class:`~gpt2.errors.UserError` becomes one line on stderr and its exit code, a stop signal
    that ended the command before training (or after it) one line and exit status 0."""
    from gpt2 import signals
    from gpt2.errors import UserError

    with signals.installed():
        try:
            return fn(*args) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except signals.Stopped as e:
            print(f"stopped by {e.name} {e.where}", file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
