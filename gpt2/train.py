"""Entry point: ``python gpt2/train.py [flags]`` from the repository root (or ``python -m gpt2.train``).

Parse and validate every flag first (one line and exit status 2 on bad input), then run.
"""

from __future__ import annotations

import sys

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/train.py
    import _as_script  # noqa: F401

from gpt2.cli import main_guard, parse


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv, prog="train.py")
    from gpt2.trainer.run import run

    return main_guard(run, cfg)


if __name__ == "__main__":
    sys.exit(main())
