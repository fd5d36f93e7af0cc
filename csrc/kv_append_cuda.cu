// CUDA kernel of mahalo::kv_append_ranges: for every pair, copy tokens [0, count) of slot src_slot
// of the src cache to [dst_start, dst_start + count) of slot dst_slot of the dst cache, for every
// layer, K and V and kv head, in one launch. Indices are read on the device (graph-safe, no sync).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kv_append.h"
#include "kv_vec.h"

namespace mahalo {
namespace {

constexpr int kThreads = 128;  // a step is short (tens of tokens): small blocks, many of them
constexpr int64_t kMaxGridYZ = 65535;

// Grid: z strides over pairs, y over (plane, head) rows; a block's threads stride over the vectors
// of one row's range.
template <typename Vec, typename Index>
__global__ void __launch_bounds__(kThreads)
    kv_append_ranges_kernel(char* dst, const char* src, PairIndex pairs, int64_t num_pairs,
                            AppendLayout layout) {
  const int64_t vecs_per_token = layout.token_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t rows = layout.rows();
  for (int64_t p = blockIdx.z; p < num_pairs; p += gridDim.z) {
    const int64_t s = pairs.get<Index>(kAppendSrc, p), d = pairs.get<Index>(kAppendDst, p);
    const int64_t a = pairs.get<Index>(kAppendStart, p), c = pairs.get<Index>(kAppendCount, p);
    if (!layout.in_bounds(s, d, a, c)) continue;
    const int64_t n = c * vecs_per_token;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
      const Vec* from = reinterpret_cast<const Vec*>(
          src + layout.offset(r, s, layout.src_slots, layout.src_len));
      Vec* to = reinterpret_cast<Vec*>(dst + layout.offset(r, d, layout.dst_slots, layout.dst_len)) +
                a * vecs_per_token;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) to[i] = from[i];
    }
  }
}

template <typename Vec, typename Index>
cudaError_t launch(char* dst, const char* src, const PairIndex& pairs, int64_t num_pairs,
                   const AppendLayout& layout, cudaStream_t stream) {
  const dim3 grid(1, static_cast<unsigned>(std::min(layout.rows(), kMaxGridYZ)),
                  static_cast<unsigned>(std::min(num_pairs, kMaxGridYZ)));
  kv_append_ranges_kernel<Vec, Index><<<grid, kThreads, 0, stream>>>(dst, src, pairs, num_pairs,
                                                                     layout);
  return cudaGetLastError();
}

template <typename Index>
cudaError_t launch_index(void* dst, const void* src, const PairIndex& pairs, int64_t num_pairs,
                         const AppendLayout& layout, cudaStream_t stream) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  return with_vec(vec_width(layout.token_bytes, {dst, src}), [&](auto tag) {
    return launch<typename decltype(tag)::type, Index>(d, s, pairs, num_pairs, layout, stream);
  });
}

}  // namespace

const char* launch_kv_append_ranges_cuda(void* dst, const void* src, const PairIndex& pairs,
                                         bool index64, int64_t num_pairs,
                                         const AppendLayout& layout, void* stream) {
  if (num_pairs == 0 || layout.rows() == 0 || layout.token_bytes == 0) return nullptr;
  const auto st = static_cast<cudaStream_t>(stream);
  const cudaError_t err = index64
                              ? launch_index<int64_t>(dst, src, pairs, num_pairs, layout, st)
                              : launch_index<int32_t>(dst, src, pairs, num_pairs, layout, st);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mahalo
