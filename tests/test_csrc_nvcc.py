"""CI compile checks of the CUDA side of csrc/ on machines without a GPU.

- every ``csrc/*.cu`` compiles with ``nvcc -arch=sm_90a -c`` (object output only);
- the CUDA torch binding (``csrc/*.cpp`` with ``MAHALO_WITH_CUDA``) passes the host compiler's
  syntax check against torch's headers;
- the CUDA kernel's own code (grid sizing, prefix-sum work list, shuffles and barriers, vector
  width, multiply-high division, in-bounds skip) runs on the host under an emulation of the launch
  (every block, its threads as fibers) and matches a plain memcpy reference: the GPU-only index
  logic is exercised in CI without a GPU.
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

# The copy kernel cooperates within a block (shared-memory prefix sums, warp shuffles, barriers),
# so its emulation runs a block's threads as fibers on one OS thread: __syncthreads() returns to a
# scheduler that runs every thread up to its next barrier before any thread passes it, and a
# shuffle is a barrier-separated exchange through a lane table.
_EMU_FIBER_PRELUDE = r"""
#pragma once
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <utility>
#include <vector>
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(n)
inline uint3 blockIdx, threadIdx;
inline dim3 gridDim, blockDim;
inline cudaError_t emu_error = cudaSuccess;
inline long long emu_blocks = 0;
struct EmuFiber { ucontext_t ctx; std::vector<char> stack; bool done; };
inline std::vector<EmuFiber> emu_fibers;
inline ucontext_t emu_scheduler;
inline std::function<void()> emu_body;
inline unsigned emu_current = 0;
inline void __syncthreads() { swapcontext(&emu_fibers[emu_current].ctx, &emu_scheduler); }
inline void emu_entry() { emu_body(); emu_fibers[emu_current].done = true; }
inline uint64_t emu_lanes[1024];
template <typename T> T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const unsigned t = threadIdx.x;
  emu_lanes[t] = static_cast<uint64_t>(v);
  __syncthreads();
  const T r = (t & 31u) >= delta ? static_cast<T>(emu_lanes[t - delta]) : v;
  __syncthreads();
  return r;
}
template <typename T> T __shfl_sync(unsigned, T v, int src) {
  const unsigned t = threadIdx.x;
  emu_lanes[t] = static_cast<uint64_t>(v);
  __syncthreads();
  const T r = static_cast<T>(emu_lanes[(t & ~31u) + static_cast<unsigned>(src)]);
  __syncthreads();
  return r;
}
template <typename K, typename... A>
void emulate_launch(K kernel, dim3 grid, int threads, A... args) {
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 ||
      threads > 1024) {
    emu_error = cudaErrorInvalidConfiguration;
    return;
  }
  gridDim = grid;
  blockDim = dim3(threads, 1, 1);
  emu_fibers.resize(threads);
  emu_body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = {x, y, z};
      ++emu_blocks;
      for (auto& f : emu_fibers) {
        f.stack.resize(1 << 16);
        f.done = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &emu_scheduler;
        makecontext(&f.ctx, emu_entry, 0);
      }
      for (;;) {  // one round = every thread up to its next barrier (or its end)
        int done = 0;
        for (unsigned t = 0; t < static_cast<unsigned>(threads); ++t) {
          if (emu_fibers[t].done) { ++done; continue; }
          emu_current = t;
          threadIdx = {t, 0, 0};
          swapcontext(&emu_scheduler, &emu_fibers[t].ctx);
          done += emu_fibers[t].done;
        }
        if (done == threads) break;
        if (done != 0) {  // some threads ended while others wait at a barrier: a CUDA deadlock
          std::fprintf(stderr, "block (%u,%u,%u): %d of %d threads passed a barrier the others "
                       "never reached\n", x, y, z, done, threads);
          std::exit(3);
        }
      }
    }
}
#define cudaGetLastError() std::exchange(emu_error, cudaSuccess)
#define cudaDeviceGetAttribute(out, attr, dev) \
  (*(out) = std::atoi(std::getenv("EMU_SMS")), cudaSuccess)
#define cudaGetErrorString(e) " (emulated launch failed)"
"""

_EMU_MAIN = r"""
#include "kv_copy_emu.cpp"
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace mahalo;

// The multiply-high division against `/` on edge and random operands.
static bool check_fastdiv(unsigned seed) {
  std::mt19937 g(seed);
  std::vector<uint32_t> ds = {1, 2, 3, 5, 7, 8, 96, 127, 128, 129, 1000, 65535, 65536, 65537,
                              (1u << 30) - 1, 1u << 30, (1u << 30) + 1, (1u << 31) - 1};
  for (int i = 0; i < 200; ++i) ds.push_back(1 + g() % ((1u << 31) - 1));
  for (uint32_t d : ds) {
    const FastDiv32 f = FastDiv32::of(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, (1u << 31) - 1, (1u << 31) - 2};
    for (int i = 0; i < 2000; ++i) ns.push_back(g() % (1u << 31));
    for (uint32_t n : ns) {
      if (n >= (1u << 31)) continue;
      if (f.div(n) != n / d) {
        std::printf("FastDiv32(%u).div(%u) = %u, expected %u\n", d, n, f.div(n), n / d);
        return false;
      }
    }
  }
  return true;
}

// Cache [planes/2, 2, S, heads, T, token_bytes] of random bytes, `misalign` bytes past a 64-byte
// boundary; P pairs with distinct dst slots never used as src. Ranges: `kind` 0 = ragged random,
// 1 = every range `len` tokens at a random start; pair 0 a whole slot and, for P > 5, an empty
// range, a range touching T, one past T (skipped by the kernel), one token and a reversed range.
static bool run_case(int64_t planes, int64_t S, int64_t heads, int64_t T, int64_t tb, int misalign,
                     int64_t P, bool idx64, unsigned seed, int kind = 0, int64_t len = 0) {
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
    if (kind == 1) {
      a[p] = g() % (T - len + 1);
      b[p] = a[p] + len;
    } else {
      const int64_t x = g() % (T + 1), y = g() % (T + 1);
      a[p] = std::min(x, y);
      b[p] = std::max(x, y);
    }
  }
  a[0] = 0, b[0] = T;
  if (P > 5) {
    a[1] = b[1] = T / 2;
    a[2] = T - 1, b[2] = T;
    a[3] = 1, b[3] = T + 1;
    a[4] = T / 3, b[4] = T / 3 + 1;
    a[5] = T / 2 + 1, b[5] = T / 2;
  }
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
  emu_blocks = 0;
  const char* err = launch_kv_copy_ranges_cuda(base, pairs, idx64, P, L, 0, nullptr);
  int64_t bad = 0;
  for (int64_t i = 0; i < total; ++i) bad += base[i] != ref[i];
  std::printf("planes=%lld S=%lld heads=%lld T=%lld token_bytes=%lld misalign=%d P=%lld "
              "kind=%d len=%lld grid=%u blocks=%lld: %lld bytes differ%s\n", (long long)planes,
              (long long)S, (long long)heads, (long long)T, (long long)tb, misalign, (long long)P,
              kind, (long long)len, gridDim.x, emu_blocks, (long long)bad, err ? err : "");
  return bad == 0 && err == nullptr;
}

int main() {
  bool ok = check_fastdiv(0);
  ok &= run_case(4, 6, 2, 300, 128, 0, 2, true, 1);        // 16-byte vectors, few long ranges
  ok &= run_case(4, 6, 2, 300, 128, 0, 2, false, 2);       // int32 indices
  ok &= run_case(2, 3, 1, 5000, 16, 0, 1, true, 3);        // one long range: many CTAs, unrolled
  ok &= run_case(2, 12, 2, 37, 8, 0, 6, true, 4);          // 8-byte vectors, edge ranges
  ok &= run_case(2, 12, 2, 37, 12, 0, 6, false, 5);        // 4-byte vectors
  ok &= run_case(2, 12, 2, 37, 6, 2, 6, true, 6);          // 2-byte vectors
  ok &= run_case(2, 6, 2, 40, 128, 8, 4, true, 11);        // base 8 bytes off: 8-byte vectors
  ok &= run_case(2, 6, 2, 40, 16, 2, 4, false, 12);        // base 2 bytes off: 2-byte vectors
  ok &= run_case(2, 12, 2, 37, 3, 1, 6, true, 7);          // 1-byte
  ok &= run_case(6, 300, 1, 9, 64, 0, 140, true, 8);       // many short ranges
  ok &= run_case(4, 24, 2, 90, 128, 0, 10, false, 13, 1, 16);  // promote-like: 16-token ranges
  ok &= run_case(4, 24, 2, 90, 128, 0, 10, false, 14, 1, 17);  // 17 tokens
  ok &= run_case(4, 24, 2, 90, 128, 0, 10, true, 15, 1, 1);    // 1 token each
  ok &= run_case(4, 24, 2, 90, 128, 0, 10, true, 16, 1, 0);    // all empty but pair 0
  ok &= run_case(1, 2400, 1, 3, 4, 0, 1100, false, 9);     // more pairs than a scan tile
  return ok ? 0 : 1;
}
"""
_EMU_LAUNCH = ("kv_copy_ranges_kernel<Vec, Index, Off>\n"
               "      <<<grid, kThreads, 0, stream>>>(cache, pairs, num_pairs, layout, plan);")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): no cuda_runtime.h")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler (c++)")
def test_cuda_kernel_logic_emulated_on_host(tmp_path):
    cuda_include = _cuda_include()
    assert cuda_include is not None, "nvcc --dryrun named no include directory with cuda_runtime.h"
    source = (CSRC / "kv_copy_cuda.cu").read_text()
    assert _EMU_LAUNCH in source, "kv_copy_cuda.cu's launch statement changed: update _EMU_LAUNCH"
    source = source.replace(_EMU_LAUNCH, "emulate_launch(kv_copy_ranges_kernel<Vec, Index, Off>, "
                                         "grid, kThreads, cache, pairs, num_pairs, layout, plan);")
    source = source.replace('#include "kv_vec.h"', '#include "kv_vec.h"\n#include "emu_prelude.h"')
    (tmp_path / "kv_copy_emu.cpp").write_text(source)
    (tmp_path / "emu_prelude.h").write_text(_EMU_FIBER_PRELUDE)
    (tmp_path / "main.cpp").write_text(_EMU_MAIN)
    # UBSan's alignment check stands in for the fault a misaligned vector access raises on a GPU.
    # The second build lowers the 32-bit work limit so that small shapes run the 64-bit path and
    # split their pairs into small scan tiles.
    for name, flags in (("emu", []), ("emu64", ["-DMAHALO_KV_COPY_MAX32=int64_t{700}"])):
        exe = tmp_path / name
        _run(["c++", "-std=c++17", "-O2", "-fsanitize=alignment", "-fno-sanitize-recover=all",
              *flags, f"-I{CSRC}", f"-I{tmp_path}", f"-I{cuda_include}",
              str(tmp_path / "main.cpp"), "-o", str(exe)])
        # A grid sized for 1 SM (long per-CTA shares) and for 8 (32 CTAs: short shares, idle
        # CTAs past the work). Every emulated barrier costs two context switches, so no more.
        for sms in (1, 8):
            proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, EMU_SMS=str(sms)))
            assert proc.returncode == 0, f"{name} EMU_SMS={sms}:\n{proc.stdout}{proc.stderr}"
