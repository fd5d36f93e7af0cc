#!/usr/bin/env bash
# The first (and often only) run on a lent GPU machine (H100/H200; torch 2.11 + CUDA 13 +
# Triton 3.6, no network), sized for ONE device call: every stage has a budget and the budgets
# sum to <= 540 s, under the call's 600 s cut. Stages run in order of what they teach:
#   env       gpu.txt    interpreter, versions, nvcc, CUDA_HOME, device, SDPA backends
#   build     build.log  verbose CUDA build of mahalo_engine._C, the kernel registered and run
#                        once, cuobjdump --list-elf; a failed build STOPS the run here (every
#                        later stage would only fail at import)
#   graphs    tests.xml  every GPU-marked test (CUDA graphs vs eager first: engine, cache, KV ops,
#                        sampling buffers; bf16 training)
#   fullsize  fullsize.json  bf16 graph vs eager generate at the Qwen2.5-0.5B shape (V = 151936)
#   kernels   kernels.xml    the Triton kernel tests compiled for the card (no interpreter)
#   bench1    bench.json the decode and search sections (the engine's graphs at full size)
#   bench2    bench.json heads, kv, train (quick sizes), appended to the same JSON
# tests.log and bench.log hold the pytest and bench output. At most 8 files come back from $OUT.
#
# Usage (device tool):   bash bench/device_check.sh
#   DRY_RUN=1 bash bench/device_check.sh     print each stage's command and budget, run nothing
#   STAGES=bench1,bench2 bash bench/device_check.sh   a subset (build needs a fresh machine once)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/mahalo-device-out}
PY=${PYTHON:-$(command -v python3 || command -v python)}
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-env,build,graphs,fullsize,kernels,bench1,bench2}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

PYTEST_FLAGS="-q -rA --durations=25 -p no:cacheprovider -o faulthandler_timeout=60"
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_FLAGS="$PYTEST_FLAGS --timeout=90"
fi
BENCH="$PY -m bench --device cuda --keep-going --out $OUT/bench.json"

# name | budget (s) | command. Output of every command goes to the stage's log in $OUT.
STAGE_TABLE=(
  "env|20|$PY -m bench.device_report env > $OUT/gpu.txt 2>&1"
  "build|150|TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 $PY -m pip install -v --no-deps --no-build-isolation -e . > $OUT/build.log 2>&1 && $PY -m bench.device_report extension >> $OUT/build.log 2>&1"
  "graphs|100|$PY -m pytest $PYTEST_FLAGS -m gpu --junitxml=$OUT/tests.xml tests/test_engine_graphs.py tests/test_engine.py tests --ignore=tests/test_triton_multihead_compile.py >> $OUT/tests.log 2>&1"
  "fullsize|60|$PY -m bench.graph_check --out $OUT/fullsize.json >> $OUT/bench.log 2>&1"
  "kernels|90|$PY -m pytest $PYTEST_FLAGS -m 'not gpu' --junitxml=$OUT/kernels.xml tests/test_triton_*.py --ignore=tests/test_triton_multihead_compile.py --ignore=tests/test_triton_cascade_compile.py >> $OUT/tests.log 2>&1"
  "bench1|75|$BENCH --sections decode,search >> $OUT/bench.log 2>&1"
  "bench2|45|$BENCH --append --quick --sections heads,kv,train >> $OUT/bench.log 2>&1"
)

selected() { [[ ",$STAGES," == *",$1,"* ]]; }

total=0
for row in "${STAGE_TABLE[@]}"; do
  IFS='|' read -r name budget cmd <<< "$row"
  selected "$name" && total=$((total + budget))
done

if [[ "$DRY_RUN" == 1 ]]; then
  for row in "${STAGE_TABLE[@]}"; do
    IFS='|' read -r name budget cmd <<< "$row"
    selected "$name" && printf '%-9s %4ss  %s\n' "$name" "$budget" "$cmd"
  done
  echo "total budget: ${total}s (one device call is cut at 600s)"
  exit 0
fi

mkdir -p "$OUT"
: > "$OUT/tests.log"
: > "$OUT/bench.log"
summary=()
status=0
for row in "${STAGE_TABLE[@]}"; do
  IFS='|' read -r name budget cmd <<< "$row"
  selected "$name" || continue
  echo "== $name (budget ${budget}s): $cmd"
  start=$SECONDS
  # SIGINT first: pytest and the bench then print what they have (failures, the JSON so far);
  # KILL 10 s later if that hangs.
  timeout -s INT -k 10 "$budget" bash -c "$cmd"
  rc=$?
  summary+=("$name rc=$rc $((SECONDS - start))s/${budget}s")
  [[ $rc == 0 ]] || status=1
  if [[ "$name" == build && $rc != 0 ]]; then
    echo "BUILD FAILED (rc=$rc): later stages skipped. Last lines of build.log:"
    tail -n 40 "$OUT/build.log"
    break
  fi
done

echo
echo "== summary (total budget ${total}s, $SECONDS s used)"
printf '%s\n' "${summary[@]}"
[[ -s "$OUT/gpu.txt" ]] && grep -E '^(torch|triton|device|CUDA_HOME)' "$OUT/gpu.txt"
grep -E 'extension loaded|registered|equals the expected|sm_[0-9]+' "$OUT/build.log" 2>/dev/null | tail -n 6
grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/tests.log" 2>/dev/null | tail -n 30
grep -E '^graph vs eager|tokens_equal' "$OUT/bench.log" 2>/dev/null | cut -c1-300 | tail -n 6
grep -E 'Error|sections that failed' "$OUT/bench.log" 2>/dev/null | tail -n 5
ls -la "$OUT"
exit $status
