// Geometry of kv_append_ranges (copy the first tokens of slots of one cache to an offset in slots of
// another) and its CUDA launcher's plain-C++ interface. No torch header: nvcc compiles the kernel
// (kv_append_cuda.cu) on its own; the torch side is kv_append.cpp / kv_append_cuda_binding.cpp.
#pragma once

#include <cstdint>

#include "kv_layout.h"

namespace mahalo {

// Both caches are contiguous [L, 2, S, n_kv, T, head_dim] with the same L, n_kv, head_dim and
// dtype; S and T differ (a prefix cache of long slots, a candidate cache of short ones).
struct AppendLayout {
  int64_t planes;       // L * 2
  int64_t heads;        // n_kv
  int64_t token_bytes;  // head_dim * element size
  int64_t src_slots, src_len;
  int64_t dst_slots, dst_len;

  MAHALO_HD int64_t rows() const { return planes * heads; }

  // Byte offset of token 0 of `slot` in row `row` (= plane * heads + head) of a cache.
  MAHALO_HD int64_t offset(int64_t row, int64_t slot, int64_t slots, int64_t len) const {
    const int64_t plane = row / heads;
    const int64_t head = row - plane * heads;
    return ((plane * slots + slot) * heads + head) * len * token_bytes;
  }

  // Pairs outside either cache are skipped by the kernels (check=True in Python reports them).
  MAHALO_HD bool in_bounds(int64_t src, int64_t dst, int64_t start, int64_t count) const {
    return src >= 0 && src < src_slots && dst >= 0 && dst < dst_slots && count >= 0 &&
           count <= src_len && start >= 0 && start + count <= dst_len;
  }
};

// The per-pair index vectors (src slot, dst slot, dst start, count) reuse PairIndex's four fields.
enum AppendField { kAppendSrc = 0, kAppendDst = 1, kAppendStart = 2, kAppendCount = 3 };

// Launches the append kernel on `stream` (a cudaStream_t). Returns nullptr on success, else the
// CUDA error string. Defined in kv_append_cuda.cu.
const char* launch_kv_append_ranges_cuda(void* dst, const void* src, const PairIndex& pairs,
                                         bool index64, int64_t num_pairs,
                                         const AppendLayout& layout, void* stream);

}  // namespace mahalo
