"""CI compile checks of the CUDA side of csrc/ on machines without a GPU.

- every ``csrc/*.cu`` compiles with ``nvcc -arch=sm_90a -c`` (object output only);
- the CUDA torch binding (``csrc/*.cpp`` with ``MAHALO_WITH_CUDA``) passes the host compiler's
  syntax check against torch's headers;
- the CUDA kernel's own code (grid sizing, grid-stride loops, vector width, in-bounds skip) runs
  on the host under an emulation of the launch (every block and thread in turn) and matches a
  plain memcpy reference: the GPU-only index logic is exercised in CI without a GPU.
All skip with a reason when nvcc (or a C++ compiler) is absent; a compile error fails the run.
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


# Host emulation of kv_copy_cuda.cu: the launch statement becomes a loop over every (block, thread)
# (the kernel has no __syncthreads and no shared memory, so threads run one after another), and the
# runtime calls it makes are stubbed (EMU_SMS sets the SM count the grid is sized for; a grid over
# the hardware limits fails the launch as it would on a GPU).
_EMU_PRELUDE = r"""
#pragma once
#include <cstdlib>
#include <utility>
#undef __global__
#define __global__
#define __launch_bounds__(n)
inline uint3 blockIdx, threadIdx;
inline dim3 gridDim, blockDim;
inline cudaError_t emu_error = cudaSuccess;
template <typename K, typename... A>
void emulate_launch(K kernel, dim3 grid, int threads, A... args) {
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 ||
      threads > 1024) {
    emu_error = cudaErrorInvalidConfiguration;  // what a real launch reports for such a grid
    return;
  }
  gridDim = grid;
  blockDim = dim3(threads, 1, 1);
  for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) for (int t = 0; t < threads; ++t) {
      blockIdx = {x, y, z};
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      kernel(args...);
    }
}
#define cudaGetLastError() std::exchange(emu_error, cudaSuccess)
#define cudaDeviceGetAttribute(out, attr, dev) \
  (*(out) = std::atoi(std::getenv("EMU_SMS")), cudaSuccess)
#define cudaGetErrorString(e) " (emulated launch failed: invalid configuration)"
"""

_EMU_MAIN = r"""
#include "kv_copy_emu.cpp"
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace mahalo;

// Cache [planes/2, 2, S, heads, T, token_bytes] of random bytes, `misalign` bytes past a 64-byte
// boundary; P pairs with distinct dst slots never used as src, ragged ranges plus a whole slot,
// an empty range, a range touching T and one past T (skipped by the kernel).
static bool run_case(int64_t planes, int64_t S, int64_t heads, int64_t T, int64_t tb, int misalign,
                     int64_t P, bool idx64, unsigned seed) {
  std::mt19937_64 g(seed);
  const KVLayout L{planes, S, heads, T, tb};
  const int64_t total = planes * S * heads * T * tb;
  std::vector<unsigned char> buf(total + 128);
  unsigned char* base = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) + misalign;
  for (int64_t i = 0; i < total; ++i) base[i] = static_cast<unsigned char>(g());
  std::vector<unsigned char> ref(base, base + total);
  std::vector<int64_t> perm(S), s(P), d(P), a(P), b(P);
  for (int64_t i = 0; i < S; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), g);
  for (int64_t p = 0; p < P; ++p) {
    d[p] = perm[p];
    s[p] = perm[P + g() % (S - P)];
    const int64_t x = g() % (T + 1), y = g() % (T + 1);
    a[p] = std::min(x, y);
    b[p] = std::max(x, y);
  }
  a[0] = 0, b[0] = T;
  if (P > 3) a[1] = b[1] = T / 2, a[2] = T - 1, b[2] = T, a[3] = 1, b[3] = T + 1;
  for (int64_t p = 0; p < P; ++p) {
    if (!L.in_bounds(s[p], d[p], a[p], b[p])) continue;
    for (int64_t r = 0; r < L.rows(); ++r)
      std::memcpy(ref.data() + L.row_offset(r, d[p]) + a[p] * tb,
                  ref.data() + L.row_offset(r, s[p]) + a[p] * tb, (b[p] - a[p]) * tb);
  }
  std::vector<int32_t> s32(s.begin(), s.end()), d32(d.begin(), d.end()), a32(a.begin(), a.end()),
      b32(b.begin(), b.end());
  const PairIndex pairs =
      idx64 ? PairIndex{{s.data(), d.data(), a.data(), b.data()}, {1, 1, 1, 1}}
            : PairIndex{{s32.data(), d32.data(), a32.data(), b32.data()}, {1, 1, 1, 1}};
  const char* err = launch_kv_copy_ranges_cuda(base, pairs, idx64, P, L, 0, nullptr);
  int64_t bad = 0;
  for (int64_t i = 0; i < total; ++i) bad += base[i] != ref[i];
  std::printf("planes=%lld S=%lld heads=%lld T=%lld token_bytes=%lld misalign=%d P=%lld "
              "grid=(%u,%u,%u): %lld bytes differ%s\n", (long long)planes, (long long)S,
              (long long)heads, (long long)T, (long long)tb, misalign, (long long)P, gridDim.x,
              gridDim.y, gridDim.z, (long long)bad, err ? err : "");
  return bad == 0 && err == nullptr;
}

int main() {
  bool ok = true;
  ok &= run_case(4, 6, 2, 300, 128, 0, 2, true, 1);        // 16-byte vectors, few long ranges
  ok &= run_case(4, 6, 2, 300, 128, 0, 2, false, 2);       // int32 indices
  ok &= run_case(2, 3, 1, 5000, 16, 0, 1, true, 3);        // one long range: grid x, unrolled loop
  ok &= run_case(2, 12, 2, 37, 8, 0, 5, true, 4);          // 8-byte vectors
  ok &= run_case(2, 12, 2, 37, 12, 0, 5, false, 5);        // 4-byte vectors
  ok &= run_case(2, 12, 2, 37, 6, 2, 5, true, 6);          // 2-byte vectors
  ok &= run_case(2, 6, 2, 40, 128, 8, 4, true, 11);        // base 8 bytes off: 8-byte vectors
  ok &= run_case(2, 6, 2, 40, 16, 2, 4, false, 12);        // base 2 bytes off: 2-byte vectors
  ok &= run_case(2, 12, 2, 37, 3, 1, 5, true, 7);          // 1-byte
  ok &= run_case(6, 300, 1, 9, 64, 0, 140, true, 8);       // many short ranges
  ok &= run_case(1, 140000, 1, 2, 4, 0, 70000, false, 9);  // > 65535 pairs: gridDim.z capped
  ok &= run_case(65540, 2, 1, 2, 4, 0, 1, true, 10);       // > 65535 rows: gridDim.y capped
  return ok ? 0 : 1;
}
"""
_EMU_LAUNCH = ("kv_copy_ranges_kernel<Vec, Index><<<grid, kThreads, 0, stream>>>(cache, pairs, "
               "num_pairs, layout);")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): no cuda_runtime.h")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler (c++)")
def test_cuda_kernel_logic_emulated_on_host(tmp_path):
    cuda_include = _cuda_include()
    assert cuda_include is not None, "nvcc --dryrun named no include directory with cuda_runtime.h"
    source = (CSRC / "kv_copy_cuda.cu").read_text()
    assert _EMU_LAUNCH in source, "kv_copy_cuda.cu's launch statement changed: update _EMU_LAUNCH"
    source = source.replace(_EMU_LAUNCH, "emulate_launch(kv_copy_ranges_kernel<Vec, Index>, grid, "
                                         "kThreads, cache, pairs, num_pairs, layout);")
    source = source.replace('#include "kv_layout.h"',
                            '#include "kv_layout.h"\n#include "emu_prelude.h"')
    (tmp_path / "kv_copy_emu.cpp").write_text(source)
    (tmp_path / "emu_prelude.h").write_text(_EMU_PRELUDE)
    (tmp_path / "main.cpp").write_text(_EMU_MAIN)
    exe = tmp_path / "emu"
    # UBSan's alignment check stands in for the fault a misaligned vector access raises on a GPU.
    _run(["c++", "-std=c++17", "-O2", "-fsanitize=alignment", "-fno-sanitize-recover=all",
          f"-I{CSRC}", f"-I{tmp_path}", f"-I{cuda_include}", str(tmp_path / "main.cpp"),
          "-o", str(exe)])
    for sms in (1, 132):  # a grid sized for 1 SM (long grid-stride loops) and for an H100
        proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, EMU_SMS=str(sms)))
        assert proc.returncode == 0, f"EMU_SMS={sms}:\n{proc.stdout}{proc.stderr}"
