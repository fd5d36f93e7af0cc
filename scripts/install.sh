#!/usr/bin/env bash
# One-step set-up on a fresh machine: a torch that fits the machine, then this package (editable,
# with its C++ extension built against that torch) and the test tools.
# - No torch yet: install the CPU build torch==2.13.0 first, so that nothing later pulls a multi-GB
#   CUDA build as a dependency. A machine that already has torch (e.g. a CUDA build) keeps it.
# - --no-build-isolation: the extension compiles against the torch installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q "setuptools>=64" wheel ninja
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
