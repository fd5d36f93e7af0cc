// CUDA binding of mahalo::kv_append_ranges: argument checks, device guard and current stream, then
// the launcher in kv_append_cuda.cu. Compiled only in builds with MAHALO_WITH_CUDA.
#ifdef MAHALO_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kv_append_ops.h"

namespace mahalo {
namespace {

void kv_append_ranges_cuda(const at::Tensor& dst, const at::Tensor& src,
                           const at::Tensor& src_slot, const at::Tensor& dst_slot,
                           const at::Tensor& dst_start, const at::Tensor& count) {
  const AppendLayout layout = check_kv_append_args(dst, src, src_slot, dst_slot, dst_start, count);
  const c10::cuda::CUDAGuard guard(dst.device());
  const auto device = static_cast<int>(dst.get_device());
  const char* err = launch_kv_append_ranges_cuda(
      dst.data_ptr(), src.const_data_ptr(), pair_index(src_slot, dst_slot, dst_start, count),
      src_slot.scalar_type() == at::kLong, src_slot.numel(), layout,
      c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(err == nullptr, "kv_append_ranges: CUDA kernel launch failed: ", err);
}

}  // namespace

TORCH_LIBRARY_IMPL(mahalo, CUDA, m) { m.impl("kv_append_ranges", &kv_append_ranges_cuda); }

}  // namespace mahalo

#endif  // MAHALO_WITH_CUDA
