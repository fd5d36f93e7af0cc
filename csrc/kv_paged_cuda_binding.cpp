// CUDA binding of the mahalo::kv_paged_* ops: argument checks, device guard, a [P, 4] int32 copy
// list from the caching allocator (legal in graph capture), then the launcher in kv_paged_cuda.cu.
// Compiled only in builds with MAHALO_WITH_CUDA.
#ifdef MAHALO_WITH_CUDA

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kv_paged_ops.h"

namespace mahalo {
namespace {

void run_cuda(const char* name, const at::Tensor& cache, const PagedArgs& args, int op,
              const int32_t* a, const int32_t* b, const int32_t* c, int64_t num_pairs,
              int64_t group_size) {
  const c10::cuda::CUDAGuard guard(cache.device());
  const auto device = static_cast<int>(cache.get_device());
  const at::Tensor copies =
      at::empty({num_pairs, 4}, cache.options().dtype(at::kInt));  // one BlockCopy per pair
  const char* err = launch_kv_paged_cuda(
      cache.data_ptr(), args.layout, args.state, op, a, b, c, num_pairs, group_size,
      reinterpret_cast<BlockCopy*>(copies.data_ptr<int32_t>()),
      c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(err == nullptr, name, ": CUDA kernel launch failed: ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(mahalo, CUDA, m) {
  m.impl("kv_paged_fork", &kv_paged_fork<run_cuda>);
  m.impl("kv_paged_promote", &kv_paged_promote<run_cuda>);
  m.impl("kv_paged_release", &kv_paged_release<run_cuda>);
}

}  // namespace mahalo

#endif  // MAHALO_WITH_CUDA
