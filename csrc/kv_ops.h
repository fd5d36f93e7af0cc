// Torch-side declarations shared by the CPU op (kv_ops.cpp) and the CUDA binding (kv_ops_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "kv_layout.h"

namespace mahalo {

// Metadata checks of kv_copy_ranges' arguments (shapes, dtypes, devices, cache contiguity); they read
// no tensor data, so they cost no host sync. Raises ValueError; returns the cache geometry.
KVLayout check_kv_copy_args(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& dst,
                            const at::Tensor& start, const at::Tensor& end);

// Data pointers and element strides of the four index tensors, as the kernels read them.
PairIndex pair_index(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& start,
                     const at::Tensor& end);

}  // namespace mahalo
