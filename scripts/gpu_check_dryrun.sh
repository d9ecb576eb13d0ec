#!/usr/bin/env bash
# The GPU check's offline dry run, on this CPU machine: a venv that holds only what the GPU machine's
# image holds (torch, transformers, peft, ...: no grpcio, no protobuf, none of the server's other
# packages), the carried wheels made for this machine's Python, and pip closed to every index. The
# CUDA tests skip; the attention check, the merge policy's script and one tiny bench suite run.
# Output under $OUT (gpu-dryrun-out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-dryrun-out}
# The GPU machine's transformers (its image, as last read), not ours: our attention function must work with it.
TRANSFORMERS=${DRYRUN_TRANSFORMERS:-5.17.0}
VENV=${DRYRUN_VENV:-/tmp/loramux-gpu-dryrun-venv-$TRANSFORMERS}
WHL=$(mktemp -d /tmp/loramux-dryrun-whl.XXXXXX)
EMPTY=$(mktemp -d /tmp/loramux-empty-index.XXXXXX)
make install >/dev/null
pyver=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
v() { .venv/bin/python -c "from importlib.metadata import version; print(version('$1'))"; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  # The image's packages: its transformers, the rest at the versions the tests here use.
  "$VENV/bin/python" -m pip install -q "transformers==$TRANSFORMERS" "peft==$(v peft)" \
    "safetensors==$(v safetensors)" "tokenizers==$(v tokenizers)" "numpy==$(v numpy)" \
    "prometheus-client==$(v prometheus-client)" "pytest==$(v pytest)" "pytest-timeout==$(v pytest-timeout)" packaging
fi
if "$VENV/bin/python" -c 'import grpc' 2>/dev/null; then echo "the dry-run venv must not hold grpcio" >&2; exit 1; fi
.venv/bin/python scripts/gpu_wheels.py --python-version "$pyver" --dest "$WHL"
rm -rf "$OUT"
# Every index closed: --no-index in the script, and an empty index should anything ask anyway.
OUT=$OUT GPU_CHECK_PYTHON="$VENV/bin/python" GPU_CHECK_WHEELS="$WHL" PIP_INDEX_URL="file://$EMPTY" \
  PIP_EXTRA_INDEX_URL= PIP_FIND_LINKS= bash scripts/gpu_check.sh
grep -q "^attention function with transformers .*: OK" "$OUT/summary.txt"
grep -q "^merge policy exit 0" "$OUT/summary.txt"
grep -q "^bench mixed exit 0" "$OUT/summary.txt"
echo "dry run passed: $OUT/summary.txt"
