// Torch side of the paged ops shared by the CPU kernels (kv_paged.cpp) and the CUDA binding
// (kv_paged_cuda_binding.cpp): metadata checks (no tensor data read, so no host sync; ValueError on
// failure) that return the state pointers and the cache geometry, and the op bodies, templated
// on the backend's runner (bookkeeping + block copies).
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

// A backend: runs paged_bookkeeping(op, a, b, c, num_pairs, group_size) and the copies it asks for.
using PagedRunner = void (*)(const char* name, const at::Tensor& cache, const PagedArgs& args,
                             int op, const int32_t* a, const int32_t* b, const int32_t* c,
                             int64_t num_pairs, int64_t group_size);

PagedArgs check_fork_args(const at::Tensor& cache, const at::Tensor& block_tables,
                          const at::Tensor& lens, const at::Tensor& refcounts,
                          const at::Tensor& free_stack, const at::Tensor& free_state,
                          const at::Tensor& src, const at::Tensor& dst);

PagedArgs check_promote_args(const at::Tensor& cache, const at::Tensor& block_tables,
                             const at::Tensor& lens, const at::Tensor& refcounts,
                             const at::Tensor& free_stack, const at::Tensor& free_state,
                             const at::Tensor& winners, const at::Tensor& groups,
                             const at::Tensor& start);

template <PagedRunner Run>
void kv_paged_fork(const at::Tensor& cache, const at::Tensor& block_tables, const at::Tensor& lens,
                   const at::Tensor& refcounts, const at::Tensor& free_stack,
                   const at::Tensor& free_state, const at::Tensor& src, const at::Tensor& dst) {
  const PagedArgs args = check_fork_args(cache, block_tables, lens, refcounts, free_stack,
                                         free_state, src, dst);
  Run("kv_paged_fork", cache, args, kFork, src.data_ptr<int32_t>(), dst.data_ptr<int32_t>(),
      nullptr, src.numel(), 1);
}

template <PagedRunner Run>
void kv_paged_promote(const at::Tensor& cache, const at::Tensor& block_tables,
                      const at::Tensor& lens, const at::Tensor& refcounts,
                      const at::Tensor& free_stack, const at::Tensor& free_state,
                      const at::Tensor& winners, const at::Tensor& groups,
                      const at::Tensor& start) {
  const PagedArgs args = check_promote_args(cache, block_tables, lens, refcounts, free_stack,
                                            free_state, winners, groups, start);
  Run("kv_paged_promote", cache, args, kPromote, winners.data_ptr<int32_t>(),
      groups.data_ptr<int32_t>(), start.data_ptr<int32_t>(), groups.numel(), groups.size(1));
}

template <PagedRunner Run>
void kv_paged_release(const at::Tensor& cache, const at::Tensor& block_tables,
                      const at::Tensor& lens, const at::Tensor& refcounts,
                      const at::Tensor& free_stack, const at::Tensor& free_state,
                      const at::Tensor& seqs) {
  const PagedArgs args = check_paged_args("kv_paged_release", cache, block_tables, lens,
                                          refcounts, free_stack, free_state);
  check_paged_index("kv_paged_release", "seqs", seqs, 1, cache);
  Run("kv_paged_release", cache, args, kRelease, seqs.data_ptr<int32_t>(), nullptr, nullptr,
      seqs.numel(), 1);
}

}  // namespace mahalo
