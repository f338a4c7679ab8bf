"""``python -m gpt2.report RUN_DIR [RUN_DIR...] [--out DIR]``: plots and an HTML comparison of runs.

The work is in :mod:`gpt2.track.report`; this module is the command.
"""

from __future__ import annotations

import sys

try:
    import gpt2  # noqa: F401
except ModuleNotFoundError:  # run by its path, python gpt2/report.py
    import _as_script  # noqa: F401

from gpt2.track.report import main

if __name__ == "__main__":
    sys.exit(main())
