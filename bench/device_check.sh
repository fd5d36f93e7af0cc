#!/usr/bin/env bash
# One script for the lent GPU machine (H100/H200; torch 2.11 + CUDA 13 + Triton 3.6, no network):
# build with CUDA, run the GPU tests and the kernel tests without the interpreter, then the bench.
# Sized to finish inside one 10-minute device call (stages are bounded; a stage that times out does
# not stop the next). Results under $OUT (at most 8 files come back):
#   gpu.txt  build.log  tests.log  triton.log  bench.log  bench.json
# Usage (device tool):  bash bench/device_check.sh
#   subsets: STAGES=build,triton bash bench/device_check.sh   SECTIONS=heads,kv bash bench/device_check.sh
#   (a rerun on the same warm machine can skip what already passed; build must run on a fresh one)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mahalo-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SECTIONS=${SECTIONS:-decode,heads,kv,train,search}
STAGES=${STAGES:-build,gpu,triton,bench}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1

# 1. Build: compiles csrc/*.cu for sm_90 against the machine's torch (~1-2 min on 16 cores).
stage build && { TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  timeout 170 python -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
echo "build rc=$?" | tee -a "$OUT/build.log"; }

# 2. GPU-marked tests everywhere (CUDA graphs, CUDA copy kernels, bf16 training, engine graphs).
stage gpu && { timeout 150 python -m pytest -q -m gpu tests > "$OUT/tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/tests.log"; }

# 3. Triton kernels compiled for the card (no interpreter), against the references.
stage triton && { timeout 150 python -m pytest -q -x tests/test_triton_multihead.py \
  tests/test_triton_compile.py tests/test_cascade.py > "$OUT/triton.log" 2>&1
echo "triton tests rc=$?" | tee -a "$OUT/triton.log"; }

# 4. Benchmarks (full sizes on CUDA).
stage bench && { timeout 200 python -m bench --device cuda --sections "$SECTIONS" --out "$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"; }
tail -n 3 "$OUT"/*.log
