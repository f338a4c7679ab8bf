"""``python -m gpt2.bench``, and ``python gpt2/bench`` (by its path)."""

import sys
from pathlib import Path

if not __package__:  # run by its path: sys.path[0] is gpt2/bench/, where `import gpt2` fails
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from gpt2.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
