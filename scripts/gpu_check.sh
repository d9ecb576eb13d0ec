#!/usr/bin/env bash
# The check a session lent a CUDA GPU runs there, in one call, offline:
#   1. the carried wheels (.whl/, filled here by scripts/gpu_wheels.py) installed with --no-index;
#   2. versions, CUDA, and whether that machine's transformers works with loramux's attention
#      function (the CPU engine against plain transformers), in the first lines of summary.txt;
#   3. correctness of the CUDA path against the CPU path (tests/test_cuda.py: mixed adapter kinds,
#      float32 and bfloat16);
#   4. the merge policy's constants measured on CUDA (scripts/calibrate_merge_policy.py: a forward's
#      fixed cost in rows, merge_policy.FORWARD_ROWS, an estimate for CUDA until measured), merge-policy.txt;
#   5. the bench suites on the ~1B preset, one at a time, each appended to bench.txt as it ends, so a
#      run cut off at its limit still returns every figure measured so far.
# It uses the machine's own python3 and packages (torch, transformers, peft, ... are in its image)
# and never reaches a network. Everything is written under $OUT (default gpu-out), at most 8 files.
#
#   GPU_CHECK_PYTHON   the interpreter (default python3)
#   GPU_CHECK_WHEELS   the carried wheel folder (default .whl)
#   GPU_CHECK_BUDGET_S seconds for the whole run (default 480: one device call is capped at 600)
#   GPU_CHECK_SUITES   bench suites in order (default: mixed hot, then every other suite the bench has)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-gpu-out}
PY=${GPU_CHECK_PYTHON:-python3}
WHL=${GPU_CHECK_WHEELS:-.whl}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
SITE=$(mktemp -d /tmp/loramux-site.XXXXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - ($(date +%s) - start))); }

# 1. Carried wheels only: --no-index, nothing fetched. --target keeps the image's own site-packages intact.
if compgen -G "$WHL/*.whl" >/dev/null; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHL"/*.whl >"$OUT/install.txt" 2>&1; then
    say "FAIL: installing the carried wheels from $WHL (install.txt)"; exit 1
  fi
  export PYTHONPATH="$SITE"
else
  say "note: no wheels in $WHL; run scripts/gpu_wheels.py here first if an import fails below"
fi
export PYTHONPATH="$PWD/server${PYTHONPATH:+:$PYTHONPATH}"

# 2. Versions and the attention-function check, first.
if ! "$PY" scripts/gpu_env.py 2>&1 | tee -a "$OUT/summary.txt"; then
  say "FAIL: the environment check above (loramux cannot run on this machine's packages as they are)"; exit 1
fi
tf=$("$PY" -c 'import transformers; print(transformers.__version__)')
# The engine (its own attention function, through transformers' attention interface) against plain
# transformers generate, on CPU: tests/test_runner.py.
if timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_runner.py >"$OUT/attention.txt" 2>&1; then
  say "attention function with transformers $tf: OK ($(tail -1 "$OUT/attention.txt"))"
else
  say "PROBLEM: loramux's attention function does not match transformers $tf here (attention.txt):"
  say "$(tail -5 "$OUT/attention.txt")"
fi
cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')

# 3. CUDA against CPU (skips without CUDA: the offline dry run on a CPU machine).
say "== correctness: tests/test_cuda.py"
timeout $(($(left) / 2)) "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT/cuda-tests.txt" 2>&1
say "cuda tests exit $?: $(tail -1 "$OUT/cuda-tests.txt")"

# 4. The merge policy's split price on this device (eager steps: compiling the 1B model's graphs would
#    take most of the budget); on CPU (the dry run) the tiny preset, only to see that the script runs.
if [ "$cuda" = 1 ]; then
  calib=(--preset gpu-1b --no-compile --rank 16 --rows 1,4,16,64 --shares 0.25,0.75 --rounds 3 --reps 3)
else
  calib=(--preset tiny --no-compile --rows 2,8 --shares 0.5 --rounds 1 --reps 1)
fi
say "== merge policy: scripts/calibrate_merge_policy.py ${calib[*]}"
timeout $(($(left) / 4)) "$PY" scripts/calibrate_merge_policy.py "${calib[@]}" >"$OUT/merge-policy.txt" 2>&1
say "merge policy exit $?: $(grep -h 'fixed cost\|^regret' "$OUT/merge-policy.txt" | tr '\n' ' ')"

# 5. Bench suites, each bounded by what is left of the budget.
if [ "$cuda" = 1 ]; then preset=(--preset gpu-1b --rounds 1); else preset=(--preset tiny --rounds 1 --threads 1); fi
default_suites=$("$PY" -c 'from loramux.bench.options import SUITES as S; f=["mixed","hot"]; print(*f, *[s for s in S if s not in f])')
for suite in ${GPU_CHECK_SUITES:-$default_suites}; do
  t=$(left)
  if [ "$t" -lt 30 ]; then say "bench $suite: skipped, ${t}s left of the budget"; continue; fi
  [ "$cuda" = 1 ] || [ "$suite" = mixed ] || { say "bench $suite: skipped without CUDA (the dry run runs mixed only)"; continue; }
  say "== bench $suite (${preset[*]}, ${t}s left)"
  work=$(mktemp -d /tmp/loramux-bench.XXXXXX)
  timeout "$t" "$PY" -m loramux.cli bench "${preset[@]}" --suites "$suite" --no-plots --out "$work" \
    >"$work/log.txt" 2>&1
  rc=$?
  { echo "## $suite (exit $rc)"; cat "$work/result.md" 2>/dev/null || tail -40 "$work/log.txt"; echo; } >>"$OUT/bench.txt"
  say "bench $suite exit $rc"
done
say "done in $(($(date +%s) - start))s"
