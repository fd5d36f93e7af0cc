#!/usr/bin/env bash
# The first (and often only) run on a lent GPU machine (H100/H200; torch 2.11 + CUDA 13 +
# Triton 3.6, no network), sized for ONE device call cut at 600 s: every stage has a budget, and
# the budgets plus each stage's kill grace sum to <= 570 s. Stages run in order of what they teach:
#   env       gpu.txt    interpreter, versions, nvcc, CUDA_HOME, device, SDPA backends
#   build     build.log  verbose CUDA build of mahalo_engine._C (bench/device_build.sh: editable
#                        install, or in place when site-packages is read-only; the log says
#                        which), the kernel registered and run once, its architectures; a failed
#                        build STOPS the run here (every later stage would only fail at import)
#   graphs    tests.xml  CUDA graphs vs eager (tests/test_engine_graphs.py, tests/test_engine.py)
#                        as their own pytest first (its JUnit XML), then every other GPU-marked
#                        test file, listed in order of value (csrc CUDA kernels first)
#   fullsize  fullsize.json  bf16 graph vs eager generate at the Qwen2.5-0.5B shape (V = 151936)
#   kernels   (tests.log)    the Triton kernel tests compiled for the card (no interpreter),
#                        listed in order of value; the sm_90 AOT compile tests are CI's
#   bench1    bench.json the decode and search sections, --quick with per-section budgets (the
#                        engine's graphs at full size; rows reach the JSON as they are measured)
#   bench2    bench.json heads, kv, train (quick sizes), appended to the same JSON
# tests.log and bench.log hold the pytest and bench output (pytest -rA lists every outcome).
# At most 8 files come back from $OUT: the 7 above; a temporary file or lock left by a write or
# a bench cut mid-way is removed at the end (bench.json holds the last complete write).
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
GRACE=5  # seconds between a stage's SIGINT (pytest and the bench report what they have) and KILL
export PYTHONUNBUFFERED=1
# An in-place build (read-only site-packages) is found from the checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

PYTEST_FLAGS="-q -rA --durations=25 -p no:cacheprovider -o faulthandler_timeout=60"
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_FLAGS="$PYTEST_FLAGS --timeout=90"
fi
PYTEST="$PY -m pytest $PYTEST_FLAGS"
BENCH="$PY -m bench --device cuda --keep-going --out $OUT/bench.json"
# Graphs vs eager: the tests a first GPU run must settle, before anything else.
GRAPH_TESTS="tests/test_engine_graphs.py tests/test_engine.py"
# Every other file with GPU-marked tests, most valuable first: the csrc CUDA kernels just built,
# the Triton kernels' graph replays, the engine's layouts and beam search (graphs vs eager, the
# promote with moves), then the rest.
# tests/test_device_check.py checks that the two lists together hold every GPU-marked test.
GPU_TESTS="tests/test_kv_ops.py tests/test_kv_paged.py tests/test_kv_append.py tests/test_cache.py
  tests/test_slots.py tests/test_triton_multihead.py tests/test_triton_cascade_decode.py
  tests/test_triton_cascade_extend.py tests/test_engine_layouts.py tests/test_engine_beams.py
  tests/test_engine_embedding.py
  tests/test_triton_multihead_ops.py tests/test_prm.py tests/test_loader.py
  tests/test_training_mah_dpo.py"
# The Triton kernels against their references on the card, most valuable first: the fused
# multi-head sampler, cascade decode and extend attention, the heads merge, the plans.
KERNEL_TESTS="tests/test_triton_multihead.py tests/test_triton_cascade_decode.py
  tests/test_triton_cascade_extend.py tests/test_triton_multihead_merge.py
  tests/test_triton_multihead_plan.py tests/test_triton_multihead_ops.py"
GPU_TESTS=$(echo $GPU_TESTS)
KERNEL_TESTS=$(echo $KERNEL_TESTS)

# name | budget (s) | command. Output of every command goes to the stage's log in $OUT.
STAGE_TABLE=(
  "env|15|$PY -m bench.device_report env > $OUT/gpu.txt 2>&1"
  "build|150|PYTHON=$PY bash bench/device_build.sh > $OUT/build.log 2>&1"
  "graphs|130|$PYTEST -m gpu --junitxml=$OUT/tests.xml $GRAPH_TESTS >> $OUT/tests.log 2>&1; r=\$?; $PYTEST -m gpu $GPU_TESTS >> $OUT/tests.log 2>&1 && exit \$r"
  "fullsize|50|$PY -m bench.graph_check --out $OUT/fullsize.json >> $OUT/bench.log 2>&1"
  "kernels|85|$PYTEST -m 'not gpu' $KERNEL_TESTS >> $OUT/tests.log 2>&1"
  "bench1|65|$BENCH --quick --budget decode=30,search=20 --sections decode,search >> $OUT/bench.log 2>&1"
  "bench2|40|$BENCH --append --quick --budget 12 --sections heads,kv,train >> $OUT/bench.log 2>&1"
)

selected() { [[ ",$STAGES," == *",$1,"* ]]; }

total=0
for row in "${STAGE_TABLE[@]}"; do
  IFS='|' read -r name budget cmd <<< "$row"
  selected "$name" && total=$((total + budget + GRACE))
done

if [[ "$DRY_RUN" == 1 ]]; then
  for row in "${STAGE_TABLE[@]}"; do
    IFS='|' read -r name budget cmd <<< "$row"
    selected "$name" && printf '%-9s %4ss  %s\n' "$name" "$budget" "$cmd"
  done
  echo "total budget: ${total}s with ${GRACE}s kill grace per stage (one device call is cut at 600s)"
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
  # KILL $GRACE s later if that hangs.
  timeout -s INT -k "$GRACE" "$budget" bash -c "$cmd"
  rc=$?
  summary+=("$name rc=$rc $((SECONDS - start))s/${budget}s")
  [[ $rc == 0 ]] || status=1
  if [[ "$name" == build && $rc != 0 ]]; then
    echo "BUILD FAILED (rc=$rc): later stages skipped. Last lines of build.log:"
    tail -n 40 "$OUT/build.log"
    break
  fi
done

# A write killed between its temporary file and the rename leaves that file behind (bench.json.tmp,
# or a hidden .bench.json.XXXXXX), a killed bench its bench.json.lock: the outputs hold the last
# complete writes, so these go (at most 8 files come back).
for left in "$OUT"/*.tmp "$OUT"/.[!.]* "$OUT"/*.lock; do
  [[ -f "$left" ]] || continue
  echo "removing $left (left by a write or a run cut mid-way; the outputs hold the last complete one)"
  rm -f "$left"
done

echo
echo "== summary (total budget ${total}s, $SECONDS s used)"
printf '%s\n' "${summary[@]}"
[[ -s "$OUT/gpu.txt" ]] && grep -E '^(torch|triton|device|CUDA_HOME)' "$OUT/gpu.txt"
grep -E '^build: |extension loaded|registered|equals the expected|sm_[0-9]+' "$OUT/build.log" 2>/dev/null | tail -n 8
grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/tests.log" 2>/dev/null | tail -n 30
grep -E '^graph vs eager|tokens_equal' "$OUT/bench.log" 2>/dev/null | cut -c1-300 | tail -n 6
grep -E 'Error|sections that failed|> cut at|interrupted after' "$OUT/bench.log" 2>/dev/null | tail -n 8
ls -la "$OUT"
exit $status
