"""The training-step benchmark, ``python -m gpt2.bench`` (see :mod:`gpt2.bench.cli`), by role:

- ``cases.py``: what is measured, as data: workloads, published anchors, one row per case;
- ``workers.py``: the measurements made in a worker process (training step, reference, generation);
- ``gemm.py``: this machine's GEMM ceiling;
- ``runner.py``: the worker processes: time limits, interleaved rounds;
- ``report.py``: ``bench.md`` and ``bench.json``;
- ``cli.py``: the command line; ``machine.py``: where a case ran.
"""

from gpt2.bench.cases import ANCHORS, CASES, CORE, PRESETS, Case
from gpt2.bench.cli import main
from gpt2.bench.workers import GENERATE_TOKENS

__all__ = ["ANCHORS", "CASES", "CORE", "GENERATE_TOKENS", "PRESETS", "Case", "main"]
