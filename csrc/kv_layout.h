// Geometry of the slot KV cache and the CUDA launcher's plain-C++ interface.
//
// This header is shared by the torch-side C++ (kv_ops.cpp, kv_ops_cuda.cpp) and the CUDA kernel
// (kv_copy_cuda.cu). It includes no torch header, so nvcc can compile the kernel on its own.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MAHALO_HD __host__ __device__ __forceinline__
#else
#define MAHALO_HD inline
#endif

namespace mahalo {

// The cache is one contiguous tensor [L, 2, S, n_kv, T_max, head_dim]. Fixing (layer, K|V, head)
// leaves S "rows" of T_max tokens, one per slot, and a token range of one slot is contiguous
// memory. Copies therefore run over (pair, plane*n_kv + head) rows of whole tokens.
struct KVLayout {
  int64_t planes;       // L * 2: every layer's K and V
  int64_t slots;        // S
  int64_t heads;        // n_kv
  int64_t max_len;      // T_max
  int64_t token_bytes;  // head_dim * element size

  MAHALO_HD int64_t rows() const { return planes * heads; }

  // Byte offset of token 0 of `slot` in row `row` (= plane * heads + head).
  MAHALO_HD int64_t row_offset(int64_t row, int64_t slot) const {
    const int64_t plane = row / heads;
    const int64_t head = row - plane * heads;
    return ((plane * slots + slot) * heads + head) * max_len * token_bytes;
  }

  // The kernels copy a pair only if it lies inside the cache, so a bad index read on the device
  // (where raising is impossible without a host sync) cannot write out of bounds; the Python
  // wrapper's check=True reports such pairs as errors instead.
  MAHALO_HD bool in_bounds(int64_t src, int64_t dst, int64_t start, int64_t end) const {
    return src >= 0 && src < slots && dst >= 0 && dst < slots && start >= 0 && start <= end &&
           end <= max_len;
  }
};

// The four per-pair index vectors (src, dst, start, end), each int32 or int64 as the caller's
// template argument says, read with an element stride: strided or broadcast (stride 0) index
// tensors are used in place, never copied.
struct PairIndex {
  const void* data[4];
  int64_t stride[4];

  template <typename Index>
  MAHALO_HD int64_t get(int which, int64_t p) const {
    return static_cast<const Index*>(data[which])[p * stride[which]];
  }
};
enum PairField { kSrc = 0, kDst = 1, kStart = 2, kEnd = 3 };

// Launches the copy kernel on `stream` (a cudaStream_t) for `num_pairs` pairs whose indices are
// int64 when `index64`, else int32. Returns nullptr on success, else the CUDA error string.
// Defined in kv_copy_cuda.cu.
const char* launch_kv_copy_ranges_cuda(void* cache, const PairIndex& pairs, bool index64,
                                       int64_t num_pairs, const KVLayout& layout, int device,
                                       void* stream);

}  // namespace mahalo
