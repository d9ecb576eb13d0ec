#!/usr/bin/env bash
# The device check for a session that is lent a CUDA GPU: correctness against the CPU path,
# then the benchmark on a ~1B random-weight Llama in bfloat16. Writes under ${OUT:-gpu-out}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
make install >/dev/null
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
.venv/bin/python -m pytest -q tests/test_cuda.py tests/test_runner.py 2>&1 | tee "$OUT/cuda-tests.txt"
.venv/bin/python -m loramux.cli bench --preset gpu-1b --rounds 2 --suites mixed,hot --out "$OUT/bench" \
  2>&1 | tail -60 | tee "$OUT/bench.txt"
