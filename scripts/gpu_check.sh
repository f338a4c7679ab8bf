#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call that fits a 10-minute limit: the GPU benchmark
# (GPT-2 124M, B=16, T=1024, bf16, compiled; the core cases first), then the CUDA variants of the
# tests. Results go to $OUT (bench.md, bench.json, logs); the table is printed last.
#
#   here:  bash scripts/device_wheels.sh        # once: .whl/ with the data-only packages
#   there: bash scripts/gpu_check.sh            # carry .whl; python3 is the machine's own torch
#
# CASES (default core); BENCH_S (420) and TESTS_S (150) bound the two parts (the bench's own
# --time-budget, so no worker outlives it); a case that runs past CASE_S (150) seconds gets a row
# saying so and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
} 2>&1 | tee "$OUT/env.txt"

"$PY" -m gpt2.bench --preset gpt2-gpu --cases "${CASES:-core}" --time-budget "${BENCH_S:-420}" \
  --case-timeout "${CASE_S:-150}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"

timeout "${TESTS_S:-150}" "$PY" -m pytest -q -p no:cacheprovider -rfEs -k cuda \
  tests/test_runtime.py tests/trainer/test_step.py tests/optim/test_spam.py tests/data/test_loader.py \
  2>&1 | tee "$OUT/tests.log" | tail -n 25

echo
cat "$OUT/bench.md" 2>/dev/null || echo "no bench table (see $OUT/bench.log)"
