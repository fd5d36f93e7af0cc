// Vector width of the CUDA KV copy kernels (kv_copy_cuda.cu, kv_append_cuda.cu): the widest access
// (16, 8, 4, 2 or 1 bytes) that divides a token's bytes and every base address, chosen once per
// launch on the host. Every copied range starts on a token boundary, so that alignment holds for
// all of a launch's accesses. CUDA headers only (uint4/uint2): included by .cu files alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace mahalo {

template <typename T>
struct VecTag {
  using type = T;
};

inline int vec_width(int64_t token_bytes, std::initializer_list<const void*> bases) {
  int width = 16;
  for (; width > 1; width /= 2) {
    bool fits = token_bytes % width == 0;
    for (const void* p : bases) fits = fits && reinterpret_cast<uintptr_t>(p) % width == 0;
    if (fits) break;
  }
  return width;
}

// Calls launch(VecTag<V>{}) with the vector type V of `width` bytes; returns what it returns.
template <typename F>
cudaError_t with_vec(int width, F&& launch) {
  switch (width) {
    case 16:
      return launch(VecTag<uint4>{});
    case 8:
      return launch(VecTag<uint2>{});
    case 4:
      return launch(VecTag<uint32_t>{});
    case 2:
      return launch(VecTag<uint16_t>{});
    default:
      return launch(VecTag<uint8_t>{});
  }
}

}  // namespace mahalo
