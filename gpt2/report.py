"""``python -m gpt2.report RUN_DIR [RUN_DIR...] [--out DIR]``: plots and an HTML comparison of runs.

The work is in :mod:`gpt2.track.report`; this module is the command.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python gpt2/report.py`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from gpt2.track.report import main

if __name__ == "__main__":
    sys.exit(main())
