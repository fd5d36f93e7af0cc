#!/usr/bin/env bash
# One script for the lent GPU machine (H100/H200; torch 2.11 + CUDA 13 + Triton 3.6, no network):
# build with CUDA, run the GPU tests and the kernel tests without the interpreter, then the bench.
# Everything lands under $OUT (at most 8 files come back): build.log, tests.log, bench.log, bench.json.
# Usage (device tool): bash bench/device_check.sh   [SECTIONS=heads,kv to limit the bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mahalo-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SECTIONS=${SECTIONS:-decode,heads,kv,train,search}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

# Build: compiles csrc/*.cu for this card (sm_90) against the machine's torch.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  timeout 300 python -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
echo "build rc=$?" | tee -a "$OUT/build.log"

# GPU tests + every kernel test compiled for the card (no interpreter).
timeout 240 python -m pytest -q -x --timeout 120 -m "gpu or not slow" \
  tests/test_triton_multihead.py tests/test_kv_ops.py tests/test_cache.py tests/test_model.py \
  $(ls tests/test_engine*.py 2>/dev/null) > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/tests.log"

timeout 300 python -m bench --device cuda --sections "$SECTIONS" --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
tail -n 5 "$OUT/tests.log"
cat "$OUT/bench.log"
