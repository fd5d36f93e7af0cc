// CUDA binding of mahalo::kv_copy_ranges: argument checks, device guard and current stream, then
// the launcher in kv_copy_cuda.cu. Compiled only in builds with MAHALO_WITH_CUDA.
#ifdef MAHALO_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kv_ops.h"

namespace mahalo {
namespace {

void kv_copy_ranges_cuda(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& dst,
                         const at::Tensor& start, const at::Tensor& end) {
  const KVLayout layout = check_kv_copy_args(cache, src, dst, start, end);
  const c10::cuda::CUDAGuard guard(cache.device());
  const auto device = static_cast<int>(cache.get_device());
  const char* err = launch_kv_copy_ranges_cuda(
      cache.data_ptr(), pair_index(src, dst, start, end), src.scalar_type() == at::kLong,
      src.numel(), layout, device, c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(err == nullptr, "kv_copy_ranges: CUDA kernel launch failed: ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(mahalo, CUDA, m) { m.impl("kv_copy_ranges", &kv_copy_ranges_cuda); }

}  // namespace mahalo

#endif  // MAHALO_WITH_CUDA
