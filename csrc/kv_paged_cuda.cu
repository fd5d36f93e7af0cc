// CUDA kernels of the mahalo::kv_paged_* ops: the serial block bookkeeping of kv_paged.h in one
// thread, then one parallel launch that copies the (partial) blocks it asked for.
//
// Pure CUDA (no torch headers): the torch binding is kv_paged_cuda_binding.cpp. Everything is read
// on the device, so the two launches never sync with the host and are legal in graph capture.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kv_paged.h"

namespace mahalo {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridYZ = 65535;

// The refcounts and the free stack are shared by every pair, and pairs must see each other's
// releases in order (a block freed by one pair is allocated by the next): one thread does it all.
// It is integer work over the block tables only, O(pairs x max_blocks).
__global__ void kv_paged_bookkeeping_kernel(PagedState st, int op, const int32_t* a,
                                            const int32_t* b, const int32_t* c, int64_t num_pairs,
                                            int64_t group_size, BlockCopy* copies) {
  paged_bookkeeping(st, op, a, b, c, num_pairs, group_size, copies);
}

// Grid: z strides over copies, y over planes (layer x K|V); a block's threads stride over the
// contiguous bytes of tokens [lo, hi) of one plane of one cache block.
template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    kv_paged_copy_kernel(char* cache, PagedLayout layout, const BlockCopy* copies,
                         int64_t num_copies) {
  const int64_t vecs_per_token = layout.token_bytes / static_cast<int64_t>(sizeof(Vec));
  for (int64_t p = blockIdx.z; p < num_copies; p += gridDim.z) {
    const BlockCopy cp = copies[p];
    if (!layout.valid(cp) || cp.lo == cp.hi) continue;
    const int64_t n = (cp.hi - cp.lo) * vecs_per_token;
    for (int64_t plane = blockIdx.y; plane < layout.planes; plane += gridDim.y) {
      const Vec* from = reinterpret_cast<const Vec*>(cache + layout.offset(plane, cp.src, cp.lo));
      Vec* to = reinterpret_cast<Vec*>(cache + layout.offset(plane, cp.dst, cp.lo));
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) to[i] = from[i];
    }
  }
}

template <typename Vec>
cudaError_t launch_copy(char* cache, const PagedLayout& layout, const BlockCopy* copies,
                        int64_t num_copies, cudaStream_t stream) {
  const dim3 grid(1, static_cast<unsigned>(std::min(layout.planes, kMaxGridYZ)),
                  static_cast<unsigned>(std::min(num_copies, kMaxGridYZ)));
  kv_paged_copy_kernel<Vec><<<grid, kThreads, 0, stream>>>(cache, layout, copies, num_copies);
  return cudaGetLastError();
}

}  // namespace

const char* launch_kv_paged_cuda(void* cache, const PagedLayout& layout, const PagedState& st,
                                 int op, const int32_t* a, const int32_t* b, const int32_t* c,
                                 int64_t num_pairs, int64_t group_size, BlockCopy* copies,
                                 void* stream) {
  if (num_pairs == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  kv_paged_bookkeeping_kernel<<<1, 1, 0, s>>>(st, op, a, b, c, num_pairs, group_size, copies);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && op != kRelease && layout.planes > 0 && layout.token_bytes > 0) {
    // Widest access dividing a token's bytes and the base address: copies start on token bounds.
    const auto addr = reinterpret_cast<uintptr_t>(cache);
    int64_t width = 16;
    while (width > 1 && (layout.token_bytes % width != 0 || addr % width != 0)) width /= 2;
    char* base = static_cast<char*>(cache);
    switch (width) {
      case 16: err = launch_copy<uint4>(base, layout, copies, num_pairs, s); break;
      case 8: err = launch_copy<uint2>(base, layout, copies, num_pairs, s); break;
      case 4: err = launch_copy<uint32_t>(base, layout, copies, num_pairs, s); break;
      case 2: err = launch_copy<uint16_t>(base, layout, copies, num_pairs, s); break;
      default: err = launch_copy<uint8_t>(base, layout, copies, num_pairs, s); break;
    }
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mahalo
