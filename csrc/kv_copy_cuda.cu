// CUDA kernel of mahalo::kv_copy_ranges: for every pair, copy tokens [start, end) of slot src into
// slot dst, for every layer, K and V and kv head, in one launch.
//
// Pure CUDA (no torch headers): the torch binding is kv_ops_cuda.cpp. Indices, ranges and slots
// are read on the device, so the launch never syncs with the host and is legal in graph capture.
//
// Work mapping (a flattened work list): pair p has W_p = rows * n_p vectors to copy, n_p = its
// range's tokens * vectors per token (rows = L * 2 * n_kv). Every CTA scans the pairs' W_p into
// prefix sums in shared memory (a tile of up to kTile pairs at a time), takes one contiguous,
// equal share of the tile's total work, and its threads walk that share 256 vectors apart: so
// short and long ranges, empty ones and ragged mixes all keep every thread of every CTA busy, and
// adjacent threads touch adjacent vectors (coalesced). A vector index decodes to (pair, row,
// vector) by a monotone walk over the prefix sums and two multiply-high divisions (32-bit while
// a tile's work fits 31 bits; the host picks the tile so that it does whenever one pair's can).
// The grid depends only on shapes and capacities (pairs, rows, T_max, SM count), never on lengths.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kv_layout.h"
#include "kv_vec.h"

#ifdef __CUDACC__
#define MAHALO_DEVICE __device__ __forceinline__
#else
#define MAHALO_DEVICE inline
#endif

namespace mahalo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPairsPerThread = 2;
constexpr int kTile = kThreads * kPairsPerThread;  // pairs scanned at once
constexpr int kUnroll = 4;  // loads in flight per thread before their stores
// The grid targets this many CTAs per SM (one wave): at ~40 registers/thread and ~10 KB of shared
// memory several fit an sm_90 SM, and 4 x 256 threads x 4 x 16 B in flight per SM is well above
// what HBM latency x bandwidth needs.
constexpr int kBlocksPerSM = 4;
constexpr int kMaxDevices = 64;
// Largest work index the 32-bit path handles; a build may lower it (the host emulation test does,
// to run the 64-bit path on small shapes).
#ifndef MAHALO_KV_COPY_MAX32
#define MAHALO_KV_COPY_MAX32 ((int64_t{1} << 31) - 1)
#endif
constexpr int64_t kMax31 = (int64_t{1} << 31) - 1;
constexpr int64_t kMax32Work = MAHALO_KV_COPY_MAX32;

// n / d for n < 2^31 and 1 <= d < 2^31 with a multiply-high and a shift (Granlund-Montgomery, as
// PyTorch's IntDivider): d's magic number is computed once, each division costs two instructions.
// (An aggregate: it lives in shared memory, which allows no constructors.)
struct FastDiv32 {
  uint32_t d, magic, shift;
  MAHALO_HD static FastDiv32 of(uint32_t divisor) {
    uint32_t shift = 0;
    while (shift < 31 && (uint32_t{1} << shift) < divisor) ++shift;
    const auto magic = static_cast<uint32_t>(
        ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) / divisor + 1);
    return FastDiv32{divisor, magic, shift};
  }
  MAHALO_HD uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    return (t + n) >> shift;
  }
};

// Plain division where a tile's work needs 64 bits (a single pair over 2^31 vectors).
struct Div64 {
  uint64_t d;
  MAHALO_HD static Div64 of(uint64_t divisor) { return Div64{divisor}; }
  MAHALO_HD uint64_t div(uint64_t n) const { return n / d; }
};

template <typename Off>
struct WorkTypes;
template <>
struct WorkTypes<uint32_t> {
  using Div = FastDiv32;
};
template <>
struct WorkTypes<uint64_t> {
  using Div = Div64;
};

// Geometry in vectors, fixed per launch on the host.
struct CopyPlan {
  int64_t plane_stride, slot_stride, head_stride;  // S*n_kv*T*vpt, n_kv*T*vpt, T*vpt
  int64_t vecs_per_token;
  FastDiv32 heads;  // row -> (plane, head)
  int64_t tile;     // pairs per scan tile, <= kTile (so that a tile's total work fits Off)
};

template <typename Off>
struct PairWork {
  int32_t src, dst;  // slots (< 2^31: checked on the host)
  Off begin;                          // exclusive prefix: the pair's first work index
  Off first;                          // start * vecs_per_token
  typename WorkTypes<Off>::Div per_row;  // n_p
};

// Exclusive prefix sum of `v` over the block (every thread must call it).
template <typename Off>
MAHALO_DEVICE Off block_exclusive_scan(Off v, Off* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Off x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const Off y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  // Every warp scans the kWarps warp totals itself: no warp-divergent barrier.
  Off w = lane < kWarps ? warp_sums[lane] : Off{0};
  for (int o = 1; o < kWarps; o <<= 1) {
    const Off y = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) w += y;
  }
  const Off before = __shfl_sync(0xffffffffu, w, warp > 0 ? warp - 1 : 0);
  return (warp > 0 ? before : Off{0}) + x - v;
}

template <typename Vec, typename Index, typename Off>
__global__ void __launch_bounds__(kThreads)
    kv_copy_ranges_kernel(char* cache, PairIndex pairs, int64_t num_pairs, KVLayout layout,
                          CopyPlan plan) {
  using Div = typename WorkTypes<Off>::Div;
  __shared__ Off end_of[kTile];  // inclusive prefix sums of the tile's W_p
  __shared__ PairWork<Off> work[kTile];
  __shared__ Off warp_sums[kWarps];
  Vec* base = reinterpret_cast<Vec*>(cache);
  const Off rows = static_cast<Off>(layout.rows());
  const Off vpt = static_cast<Off>(plan.vecs_per_token);
  for (int64_t tile0 = 0; tile0 < num_pairs; tile0 += plan.tile) {
    const int count = static_cast<int>(num_pairs - tile0 < plan.tile ? num_pairs - tile0 : plan.tile);
    // 1. Each thread reads kPairsPerThread adjacent pairs (four independent index loads each).
    Off running[kPairsPerThread];
    Off sum = 0;
    for (int j = 0; j < kPairsPerThread; ++j) {
      const int q = threadIdx.x * kPairsPerThread + j;
      if (q < count) {
        const int64_t p = tile0 + q;
        const int64_t s = pairs.get<Index>(kSrc, p), d = pairs.get<Index>(kDst, p);
        const int64_t a = pairs.get<Index>(kStart, p), b = pairs.get<Index>(kEnd, p);
        const bool ok = layout.in_bounds(s, d, a, b) && a < b;
        const Off n = ok ? static_cast<Off>(b - a) * vpt : Off{0};
        work[q] = PairWork<Off>{static_cast<int32_t>(s), static_cast<int32_t>(d), Off{0}, static_cast<Off>(ok ? a : 0) * vpt,
                                Div::of(n > 0 ? n : Off{1})};
        sum += n * rows;
      }
      running[j] = sum;
    }
    // 2. Prefix sums over the tile.
    const Off before = block_exclusive_scan<Off>(sum, warp_sums);
    for (int j = 0; j < kPairsPerThread; ++j) {
      const int q = threadIdx.x * kPairsPerThread + j;
      if (q < count) {
        end_of[q] = before + running[j];
        work[q].begin = before + (j > 0 ? running[j - 1] : Off{0});
      }
    }
    __syncthreads();
    // 3. This CTA's share: contiguous, a multiple of the block size, the same for every CTA.
    const Off total = end_of[count - 1];
    const Off grid = static_cast<Off>(gridDim.x);
    const Off share = ((total + grid - 1) / grid + kThreads - 1) / kThreads * kThreads;
    const Off lo = static_cast<Off>(blockIdx.x) * share;
    const Off hi = lo + share < total ? lo + share : total;
    // 4. Copy: the pair of the first index by binary search, then a monotone walk.
    int p = 0;
    if (lo + threadIdx.x < hi) {
      int lo_q = 0, hi_q = count - 1;
      const Off x = lo + threadIdx.x;
      while (lo_q < hi_q) {  // first q with end_of[q] > x
        const int mid = (lo_q + hi_q) >> 1;
        if (end_of[mid] > x) hi_q = mid; else lo_q = mid + 1;
      }
      p = lo_q;
    }
    for (Off i = lo + threadIdx.x; i < hi; i += kUnroll * kThreads) {
      Vec v[kUnroll];
      Vec* to[kUnroll];
      int m = 0;
      for (int u = 0; u < kUnroll; ++u) {
        const Off x = i + static_cast<Off>(u) * kThreads;
        if (x >= hi) break;
        while (end_of[p] <= x) ++p;
        const PairWork<Off>& w = work[p];
        const Off local = x - w.begin;
        const Off row = w.per_row.div(local);
        const Off at = local - row * w.per_row.d + w.first;
        const uint32_t plane = plan.heads.div(static_cast<uint32_t>(row));
        const int64_t head = static_cast<int64_t>(row) - static_cast<int64_t>(plane) * plan.heads.d;
        const int64_t row_base = plane * plan.plane_stride + head * plan.head_stride + at;
        v[u] = base[row_base + static_cast<int64_t>(w.src) * plan.slot_stride];
        to[u] = base + row_base + static_cast<int64_t>(w.dst) * plan.slot_stride;
        m = u + 1;
      }
      for (int u = 0; u < m; ++u) *to[u] = v[u];
    }
    __syncthreads();  // the next tile overwrites the shared prefix sums
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

template <typename Vec, typename Index, typename Off>
cudaError_t launch(char* cache, const PairIndex& pairs, int64_t num_pairs, const KVLayout& layout,
                   const CopyPlan& plan, int64_t pair_max, int sms, cudaStream_t stream) {
  // One wave of CTAs, fewer when the largest possible tile of work needs fewer.
  const int64_t tile_max = std::min(num_pairs, plan.tile) * pair_max;
  const int64_t gx =
      std::max<int64_t>(1, std::min<int64_t>(int64_t{sms} * kBlocksPerSM, ceil_div(tile_max, kThreads)));
  const dim3 grid(static_cast<unsigned>(gx), 1, 1);
  kv_copy_ranges_kernel<Vec, Index, Off>
      <<<grid, kThreads, 0, stream>>>(cache, pairs, num_pairs, layout, plan);
  return cudaGetLastError();
}

template <typename Index>
cudaError_t launch_index(void* cache, const PairIndex& pairs, int64_t num_pairs,
                         const KVLayout& layout, int sms, cudaStream_t stream) {
  char* base = static_cast<char*>(cache);
  return with_vec(vec_width(layout.token_bytes, {cache}), [&](auto tag) {
    using Vec = typename decltype(tag)::type;
    const int64_t vpt = layout.token_bytes / static_cast<int64_t>(sizeof(Vec));
    const int64_t per_slot = layout.max_len * vpt;
    // The largest work one pair can have (a whole slot, every row); the kernel's 32-bit index
    // math needs a tile's total and every range's vector count below 2^31.
    const int64_t pair_max = layout.rows() * per_slot;
    if (layout.slots > kMax31 || layout.rows() > kMax31 || per_slot > kMax31) {
      return cudaErrorInvalidValue;
    }
    CopyPlan plan{layout.slots * layout.heads * per_slot, layout.heads * per_slot, per_slot, vpt,
                  FastDiv32::of(static_cast<uint32_t>(layout.heads)), kTile};
    if (pair_max <= kMax32Work) {
      plan.tile = std::min<int64_t>(kTile, kMax32Work / pair_max);
      return launch<Vec, Index, uint32_t>(base, pairs, num_pairs, layout, plan, pair_max, sms,
                                          stream);
    }
    return launch<Vec, Index, uint64_t>(base, pairs, num_pairs, layout, plan, pair_max, sms,
                                        stream);
  });
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
