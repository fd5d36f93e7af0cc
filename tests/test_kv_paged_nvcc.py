"""CI check of csrc/kv_paged_cuda.cu without a GPU: its launcher and kernels run on the host under
the launch emulation of tests/test_csrc_nvcc.py (every block and thread in turn), and must leave
the same cache bytes and bookkeeping as the serial bookkeeping plus plain memcpy. (nvcc
``-arch=sm_90a`` compilation of every csrc/*.cu is test_csrc_nvcc.py's.)"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from test_csrc_nvcc import _EMU_PRELUDE, CSRC, NVCC, _cuda_include, _run

_BOOK_LAUNCH = ("kv_paged_bookkeeping_kernel<<<1, 1, 0, s>>>(st, op, a, b, c, num_pairs, "
                "group_size, copies);")
_COPY_LAUNCH = ("kv_paged_copy_kernel<Vec><<<grid, kThreads, 0, stream>>>(cache, layout, copies, "
                "num_copies);")

_MAIN = r"""
#include "kv_paged_emu.cpp"
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace mahalo;

struct Host {  // one paged state in host vectors
  std::vector<int32_t> tables, lens, refs, stack, fs;
  PagedState st(int64_t S, int64_t MB, int64_t NB, int64_t bs) {
    return PagedState{tables.data(), lens.data(), refs.data(), stack.data(), fs.data(), S, MB, NB, bs};
  }
};

static bool run_case(int64_t bs, int64_t tb, int misalign, int op, unsigned seed) {
  const int64_t S = 6, MB = 4, NB = 30, planes = 4;
  std::mt19937 g(seed);
  Host h;
  h.tables.assign(S * MB, -1), h.lens.assign(S, 0), h.refs.assign(NB, 0), h.fs = {int32_t(NB), 0};
  for (int64_t b = 0; b < NB; ++b) h.stack.push_back(int32_t(NB - 1 - b));
  std::shuffle(h.stack.begin(), h.stack.end(), g);
  PagedState st = h.st(S, MB, NB, bs);
  const int32_t lens[S] = {int32_t(2 * bs), int32_t(bs + 1), int32_t(3 * bs - 1), 1, 0, 0};
  for (int64_t s = 0; s < S; ++s) {  // sequences 0-3 get their own blocks
    for (int64_t j = 0; j * bs < lens[s]; ++j) h.tables[s * MB + j] = alloc_block(st);
    h.lens[s] = lens[s];
  }
  const PagedLayout layout{planes, NB, bs, tb};
  const int64_t total = planes * NB * bs * tb;
  std::vector<unsigned char> buf(total + 128);
  unsigned char* base = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) + misalign;
  for (int64_t i = 0; i < total; ++i) base[i] = static_cast<unsigned char>(g());
  std::vector<unsigned char> ref(base, base + total);
  Host r = h;
  PagedState rst = r.st(S, MB, NB, bs);
  // fork 0,1,2 -> 3,4,5; promote groups {0,3,4} (winner 3) and {1,2,5} (winner 1) after a fork
  std::vector<int32_t> a, b, c;
  int64_t pairs = 3, k = 1;
  if (op == kFork) {
    a = {0, 1, 2}, b = {3, 4, 5};
  } else {
    std::vector<int32_t> fs = {0, 0, 1, 1}, fd = {3, 4, 2, 5};
    std::vector<BlockCopy> tmp(4);
    paged_bookkeeping(st, kFork, fs.data(), fd.data(), nullptr, 4, 1, tmp.data());
    for (const BlockCopy& cp : tmp) for (int64_t p = 0; p < planes; ++p)
      std::memcpy(base + layout.offset(p, cp.dst, 0), base + layout.offset(p, cp.src, 0), cp.hi * tb);
    r = h, rst = r.st(S, MB, NB, bs), ref.assign(base, base + total);
    // The step: winner 3 grows into a new block, winner 1 within its own partial block.
    const int32_t fresh = alloc_block(st);
    alloc_block(rst);
    h.tables[3 * MB + 2] = r.tables[3 * MB + 2] = fresh;
    h.lens[3] += 1, h.lens[1] += 1, r.lens[3] += 1, r.lens[1] += 1;
    a = {3, 1}, b = {0, 3, 4, 1, 2, 5}, c = {int32_t(2 * bs), int32_t(bs + 1)}, pairs = 6, k = 3;
  }
  std::vector<BlockCopy> copies(pairs), rcopies(pairs);
  paged_bookkeeping(rst, op, a.data(), b.data(), c.data(), pairs, k, rcopies.data());
  for (const BlockCopy& cp : rcopies) {
    if (!layout.valid(cp)) continue;
    for (int64_t p = 0; p < planes; ++p)
      std::memcpy(ref.data() + layout.offset(p, cp.dst, cp.lo),
                  ref.data() + layout.offset(p, cp.src, cp.lo), (cp.hi - cp.lo) * tb);
  }
  const char* err = launch_kv_paged_cuda(base, layout, st, op, a.data(), b.data(), c.data(), pairs,
                                         k, copies.data(), nullptr);
  int64_t bad = 0;
  for (int64_t i = 0; i < total; ++i) bad += base[i] != ref[i];
  const bool same = h.tables == r.tables && h.lens == r.lens && h.refs == r.refs &&
                    h.stack == r.stack && h.fs == r.fs;
  int64_t copied = 0;
  for (const BlockCopy& cp : rcopies) copied += layout.valid(cp) ? cp.hi - cp.lo : 0;
  std::printf("op=%d bs=%lld token_bytes=%lld misalign=%d: %lld bytes differ, state %s, %lld "
              "tokens copied%s\n", op, (long long)bs, (long long)tb, misalign, (long long)bad,
              same ? "equal" : "DIFFERS", (long long)copied, err ? err : "");
  return bad == 0 && same && err == nullptr && copied > 0;
}

int main() {
  bool ok = true;
  for (int op : {int(kFork), int(kPromote)}) {
    ok &= run_case(5, 128, 0, op, 1);  // 16-byte vectors
    ok &= run_case(3, 24, 8, op, 2);   // 8-byte vectors, base 8 bytes off
    ok &= run_case(7, 12, 0, op, 3);   // 4-byte vectors
    ok &= run_case(2, 6, 2, op, 4);    // 2-byte vectors
    ok &= run_case(4, 3, 1, op, 5);    // bytes
  }
  return ok ? 0 : 1;
}
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): no cuda_runtime.h")
@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler (c++)")
def test_paged_cuda_launcher_emulated_on_host(tmp_path):
    cuda_include = _cuda_include()
    assert cuda_include is not None, "nvcc --dryrun named no include directory with cuda_runtime.h"
    source = (CSRC / "kv_paged_cuda.cu").read_text()
    for launch in (_BOOK_LAUNCH, _COPY_LAUNCH):
        assert launch in source, f"kv_paged_cuda.cu no longer holds {launch!r}: update the test"
    source = source.replace(_BOOK_LAUNCH, "emulate_launch(kv_paged_bookkeeping_kernel, dim3(1, 1, "
                                          "1), 1, st, op, a, b, c, num_pairs, group_size, copies);")
    source = source.replace(_COPY_LAUNCH, "emulate_launch(kv_paged_copy_kernel<Vec>, grid, kThreads, "
                                          "cache, layout, copies, num_copies);")
    source = source.replace('#include "kv_paged.h"', '#include "kv_paged.h"\n#include "emu_prelude.h"')
    (tmp_path / "kv_paged_emu.cpp").write_text(source)
    (tmp_path / "emu_prelude.h").write_text(_EMU_PRELUDE)
    (tmp_path / "main.cpp").write_text(_MAIN)
    exe = tmp_path / "emu"
    _run(["c++", "-std=c++17", "-O1", "-fsanitize=alignment,address", "-fno-sanitize-recover=all",
          f"-I{CSRC}", f"-I{tmp_path}", f"-I{cuda_include}", str(tmp_path / "main.cpp"),
          "-o", str(exe)])
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, EMU_SMS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
