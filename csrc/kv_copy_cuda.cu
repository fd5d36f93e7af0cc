// CUDA kernel of mahalo::kv_copy_ranges: for every pair, copy tokens [start, end) of slot src into
// slot dst, for every layer, K and V and kv head, in one launch.
//
// Pure CUDA (no torch headers): the torch binding is kv_ops_cuda.cpp. Indices, ranges and slots
// are read on the device, so the launch never syncs with the host and is legal in graph capture.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kv_layout.h"

namespace mahalo {
namespace {

constexpr int kThreads = 256;
// The grid targets this many blocks per SM whatever the ranges are, so that short and long ranges
// both fill the GPU in one wave: at ~40 registers/thread 6 such blocks fit an sm_90 SM, and 4 of
// them keep 4 x 256 x 64 B in flight per SM, well above what HBM latency x bandwidth needs.
constexpr int kBlocksPerSM = 4;
constexpr int kMaxDevices = 64;
constexpr int64_t kMaxGridYZ = 65535;

// Grid: z strides over pairs, y over (plane, head) rows, x splits one row's range into chunks.
// Many short ranges give many (pair, row) blocks with x = 1; few long ranges get a larger x.
template <typename Vec, typename Index>
__global__ void __launch_bounds__(kThreads)
    kv_copy_ranges_kernel(char* cache, PairIndex pairs, int64_t num_pairs, KVLayout layout) {
  const int64_t vecs_per_token = layout.token_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t rows = layout.rows();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.z; p < num_pairs; p += gridDim.z) {
    const int64_t s = pairs.get<Index>(kSrc, p), d = pairs.get<Index>(kDst, p);
    const int64_t a = pairs.get<Index>(kStart, p), b = pairs.get<Index>(kEnd, p);
    if (!layout.in_bounds(s, d, a, b)) continue;
    const int64_t n = (b - a) * vecs_per_token;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
      const Vec* from =
          reinterpret_cast<const Vec*>(cache + layout.row_offset(r, s)) + a * vecs_per_token;
      Vec* to = reinterpret_cast<Vec*>(cache + layout.row_offset(r, d)) + a * vecs_per_token;
      int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
      // Four loads in flight per thread before their stores: long ranges are bound by how many
      // bytes each SM keeps in flight, not by instruction count.
      for (; i + 3 * stride < n; i += 4 * stride) {
        const Vec v0 = from[i];
        const Vec v1 = from[i + stride];
        const Vec v2 = from[i + 2 * stride];
        const Vec v3 = from[i + 3 * stride];
        to[i] = v0;
        to[i + stride] = v1;
        to[i + 2 * stride] = v2;
        to[i + 3 * stride] = v3;
      }
      for (; i < n; i += stride) to[i] = from[i];
    }
  }
}

// Multiprocessor count per device, queried once (not a stream operation; cached so that graph
// capture after the first eager call makes no runtime query at all).
cudaError_t sm_count(int device, int* out) {
  static std::atomic<int> cached[kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    const int c = cached[device].load(std::memory_order_relaxed);
    if (c > 0) {
      *out = c;
      return cudaSuccess;
    }
  }
  const cudaError_t err = cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) {
    cached[device].store(*out, std::memory_order_relaxed);
  }
  return err;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Vec, typename Index>
cudaError_t launch(char* cache, const PairIndex& pairs, int64_t num_pairs, const KVLayout& layout,
                   int sms, cudaStream_t stream) {
  const int64_t rows = layout.rows();
  const int64_t max_vecs_per_row = layout.max_len * (layout.token_bytes / sizeof(Vec));
  const int64_t gz = std::min(num_pairs, kMaxGridYZ);
  const int64_t gy = std::min(rows, kMaxGridYZ);
  // Never more chunks than a full-length row can use.
  const int64_t gx = std::max<int64_t>(
      1, std::min(ceil_div(static_cast<int64_t>(sms) * kBlocksPerSM, gy * gz),
                  ceil_div(max_vecs_per_row, kThreads)));
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  kv_copy_ranges_kernel<Vec, Index><<<grid, kThreads, 0, stream>>>(cache, pairs, num_pairs, layout);
  return cudaGetLastError();
}

template <typename Index>
cudaError_t launch_index(void* cache, const PairIndex& pairs, int64_t num_pairs,
                         const KVLayout& layout, int sms, cudaStream_t stream) {
  // Widest access that divides a token's bytes and the base address: every copied range starts
  // on a token boundary, so this alignment holds for all of them (16 B for head_dim*elem % 16 == 0).
  const auto addr = reinterpret_cast<uintptr_t>(cache);
  int64_t width = 16;
  while (width > 1 && (layout.token_bytes % width != 0 || addr % width != 0)) width /= 2;
  char* base = static_cast<char*>(cache);
  switch (width) {
    case 16:
      return launch<uint4, Index>(base, pairs, num_pairs, layout, sms, stream);
    case 8:
      return launch<uint2, Index>(base, pairs, num_pairs, layout, sms, stream);
    case 4:
      return launch<uint32_t, Index>(base, pairs, num_pairs, layout, sms, stream);
    case 2:
      return launch<uint16_t, Index>(base, pairs, num_pairs, layout, sms, stream);
    default:
      return launch<uint8_t, Index>(base, pairs, num_pairs, layout, sms, stream);
  }
}

}  // namespace

const char* launch_kv_copy_ranges_cuda(void* cache, const PairIndex& pairs, bool index64,
                                       int64_t num_pairs, const KVLayout& layout, int device,
                                       void* stream) {
  if (num_pairs == 0 || layout.rows() == 0 || layout.max_len == 0 || layout.token_bytes == 0) {
    return nullptr;
  }
  int sms = 0;
  cudaError_t err = sm_count(device, &sms);
  if (err == cudaSuccess) {
    const auto s = static_cast<cudaStream_t>(stream);
    err = index64 ? launch_index<int64_t>(cache, pairs, num_pairs, layout, sms, s)
                  : launch_index<int32_t>(cache, pairs, num_pairs, layout, sms, s);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mahalo
