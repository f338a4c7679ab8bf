"""Imported first by a module of gpt2/ that is run by its path (``python gpt2/train.py``).

Run that way, ``sys.path[0]`` is gpt2/ itself: ``import gpt2`` fails and gpt2's sub-packages
(``data``, ``model``) shadow top-level modules. This puts the repository root there instead.
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)
