"""CI compile checks of the CUDA side of csrc/ on machines without a GPU.

- every ``csrc/*.cu`` compiles with ``nvcc -arch=sm_90a -c`` (object output only);
- the CUDA torch binding (``csrc/*.cpp`` with ``MAHALO_WITH_CUDA``) passes the host compiler's
  syntax check against torch's headers.
Both skip with a reason when nvcc (or a C++ compiler) is absent; a compile error fails the run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                 if os.environ.get("CUDA_HOME") else None)


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime_api.h), found from nvcc itself."""
    if NVCC is None:
        return None
    proc = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "INCLUDES=" in line:
            for token in line.split('"'):
                token = token.strip()
                if token.startswith("-I") and (Path(token[2:]) / "cuda_runtime_api.h").is_file():
                    return Path(token[2:])
    return None


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"compile failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME)")
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm90a(source, tmp_path):
    includes = [f"-I{p}" for p in [CSRC, *include_paths()]]
    _run([NVCC, "-arch=sm_90a", "-O3", "-c", str(source), "-o", str(tmp_path / "out.o"), *includes])
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME)")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler (c++)")
def test_cuda_binding_compiles_with_torch_headers(tmp_path):
    cuda_include = _cuda_include()
    assert cuda_include is not None, "nvcc --dryrun named no include directory with cuda_runtime_api.h"
    # A CPU torch wheel ships c10/cuda headers but not the CMake-generated macros header they
    # include; on Linux it only marks c10_cuda as a shared library, which a syntax check ignores.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub_flags = []
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in include_paths()):
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        stub_flags = [f"-I{tmp_path}"]
    includes = [f"-I{p}" for p in [CSRC, *include_paths(), cuda_include, sysconfig.get_path("include")]]
    # Only the sources with CUDA-only code: the others are compiled by every build anyway.
    sources = [p for p in sorted(CSRC.glob("*.cpp")) if "MAHALO_WITH_CUDA" in p.read_text()]
    assert sources, "no csrc/*.cpp holds the CUDA binding (#ifdef MAHALO_WITH_CUDA)"
    for source in sources:
        _run(["c++", "-std=c++20", "-fsyntax-only", "-Wall", "-DMAHALO_WITH_CUDA",
              *includes, *stub_flags, str(source)])
