// Torch-side declaration shared by kv_append_ranges' CPU op (kv_append.cpp) and CUDA binding.
#pragma once

#include <ATen/core/Tensor.h>

#include "kv_append.h"
#include "kv_ops.h"

namespace mahalo {

// Metadata checks (shapes, dtypes, devices, contiguity; no tensor data read, so no host sync).
// Raises ValueError; returns the geometry of both caches.
AppendLayout check_kv_append_args(const at::Tensor& dst, const at::Tensor& src,
                                  const at::Tensor& src_slot, const at::Tensor& dst_slot,
                                  const at::Tensor& dst_start, const at::Tensor& count);

}  // namespace mahalo
