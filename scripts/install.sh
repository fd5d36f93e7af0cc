#!/usr/bin/env bash
# One-step set-up on a fresh machine: a torch that fits the machine, then this package (editable,
# with its C++ extension built against that torch) and the test tools. Prints one line per stage.
# - No torch yet: install the CPU build torch==2.13.0 first, so that nothing later pulls a multi-GB
#   CUDA build as a dependency. A machine that already has torch (e.g. a CUDA build) keeps it.
# - --no-build-isolation: the extension compiles against the torch installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stage() { echo "[install] $*" >&2; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  stage "1/3 installing torch==2.13.0 (CPU build; no torch found)"
  "$PY" -m pip install -q "torch==2.13.0"
else
  stage "1/3 keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
stage "2/3 installing build tools (setuptools, wheel, ninja)"
"$PY" -m pip install -q "setuptools>=64" wheel ninja
stage "3/3 installing mahalo-engine (editable) with its dependencies; compiling mahalo_engine._C (C++, plus CUDA where available: about a minute)"
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
stage "done"
