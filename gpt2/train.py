"""Entry point: ``python gpt2/train.py [flags]`` from the repository root (or ``python -m gpt2.train``).

Parse and validate every flag first (one line and exit status 2 on bad input), then run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: sys.path[0] is gpt2/ itself; put the repository root there instead so
    # that `import gpt2` works and gpt2's sub-packages do not shadow top-level modules.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from gpt2.cli import main_guard, parse


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv, prog="train.py")
    from gpt2.trainer.run import run

    return main_guard(run, cfg)


if __name__ == "__main__":
    sys.exit(main())
