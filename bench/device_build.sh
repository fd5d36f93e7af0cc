#!/usr/bin/env bash
# The device check's build stage: mahalo_engine._C with its CUDA kernels, then a report of what
# loaded (bench.device_report extension: which _C, its architectures, the kernel run once).
#
# The editable install (`pip install -e .`, what scripts/install.sh and users run) writes a link
# into the interpreter's site-packages; a machine image may have it read-only. Then, or when pip
# fails on a permission error, the same setup.py builds in place (`setup.py build_ext --inplace`:
# the .so lands in mahalo_engine/, found from the checkout). The log says which build ran.
# Another failure (a compiler error) is not retried: it would fail again, twice as slowly.
#
# Usage: PYTHON=python3 bash bench/device_build.sh   (TORCH_CUDA_ARCH_LIST defaults to 9.0, the
# H100/H200; MAX_JOBS to 16)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

in_place() {
  echo "build: python setup.py build_ext --inplace ($1)"
  "$PY" setup.py build_ext --inplace || { echo "build: in-place build FAILED"; exit 1; }
  echo "build: ran the in-place build (setup.py build_ext --inplace)"
}

site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null)
if [[ -n "$site" && -d "$site" && ! -w "$site" ]]; then
  in_place "site-packages $site is read-only"
else
  log=$(mktemp)
  "$PY" -m pip install -v --no-deps --no-build-isolation -e . 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [[ $rc == 0 ]]; then
    echo "build: ran the editable install (pip install -e .)"
  elif grep -qE "Permission denied|Read-only file system|Errno 13|Errno 30" "$log"; then
    in_place "pip install -e . failed with rc=$rc on a permission error"
  else
    echo "build: pip install -e . FAILED (rc=$rc)"
    rm -f "$log"
    exit "$rc"
  fi
  rm -f "$log"
fi
"$PY" -m bench.device_report extension
