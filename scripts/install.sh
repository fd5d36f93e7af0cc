#!/usr/bin/env bash
# One-step set-up on a fresh machine: a torch that fits the machine, then this package (editable,
# with its C++ extension built against that torch) and the test tools. Prints one line per stage.
# - No torch yet: install the CPU build torch==2.13.0 first, so that nothing later pulls a multi-GB
#   CUDA build as a dependency. A machine that already has torch (e.g. a CUDA build) keeps it.
# - --no-build-isolation: the extension compiles against the torch installed here.
# - --tests: also unpack Triton 3.6 (about 640 MB) for the sm_90 compile tests; the main job
#   (python3 -m bench) does not need it. MAHALO_SKIP_TRITON36=1 skips it even then (those tests skip).
set -euo pipefail
TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1 ;;
    -h|--help) echo "usage: bash scripts/install.sh [--tests]  (--tests: also Triton 3.6 for the sm_90 compile tests)"; exit 0 ;;
    *) echo "install.sh: unknown argument $arg (expected --tests)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stage() { echo "[install] $*" >&2; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  stage "1/4 installing torch==2.13.0 (CPU build; no torch found)"
  "$PY" -m pip install -q "torch==2.13.0"
else
  stage "1/4 keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
stage "2/4 installing build tools (setuptools, wheel, ninja)"
"$PY" -m pip install -q "setuptools>=64" wheel ninja
stage "3/4 installing mahalo-engine (editable) with its dependencies; compiling mahalo_engine._C (C++, plus CUDA where available: about a minute)"
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
if [ "$TESTS" = 0 ]; then
  stage "4/4 skipping Triton 3.6 (only the sm_90 compile tests use it: bash scripts/install.sh --tests)"
elif [ "${MAHALO_SKIP_TRITON36:-0}" = 1 ]; then
  stage "4/4 skipping Triton 3.6 (MAHALO_SKIP_TRITON36=1): its sm_90 compile tests will skip"
elif [ -d .triton36/triton ]; then
  stage "4/4 keeping Triton 3.6 in .triton36/"
else
  # The GPU machine runs Triton 3.6, whose ptxas spills where newer Tritons do not: the sm_90
  # ahead-of-time compile tests also build every kernel with it (tests/aot_subprocess.py). It is
  # unpacked beside the checkout (about 600 MB), never imported by the package.
  stage "4/4 unpacking Triton 3.6 (the GPU machine's version) into .triton36/ for the sm_90 compile tests"
  "$PY" -m pip install -q --no-deps --target .triton36 "triton==3.6.0"
fi
stage "done"
