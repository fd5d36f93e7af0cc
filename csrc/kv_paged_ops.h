// Torch-side declarations shared by the paged CPU ops (kv_paged.cpp) and their CUDA binding
// (kv_paged_cuda.cpp): metadata checks (no tensor data read, so no host sync; ValueError on
// failure) that return the state pointers and the cache geometry.
#pragma once

#include <ATen/core/Tensor.h>

#include "kv_paged.h"

namespace mahalo {

struct PagedArgs {
  PagedState state;
  PagedLayout layout;
};

PagedArgs check_paged_args(const char* op, const at::Tensor& cache, const at::Tensor& block_tables,
                           const at::Tensor& lens, const at::Tensor& refcounts,
                           const at::Tensor& free_stack, const at::Tensor& free_state);

// An int32, contiguous, `dim`-D index tensor on the cache's device.
void check_paged_index(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       const at::Tensor& cache);

PagedArgs check_fork_args(const at::Tensor& cache, const at::Tensor& block_tables,
                          const at::Tensor& lens, const at::Tensor& refcounts,
                          const at::Tensor& free_stack, const at::Tensor& free_state,
                          const at::Tensor& src, const at::Tensor& dst);

PagedArgs check_promote_args(const at::Tensor& cache, const at::Tensor& block_tables,
                             const at::Tensor& lens, const at::Tensor& refcounts,
                             const at::Tensor& free_stack, const at::Tensor& free_state,
                             const at::Tensor& winners, const at::Tensor& groups,
                             const at::Tensor& start);

}  // namespace mahalo
