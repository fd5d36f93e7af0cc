// The mahalo::kv_paged_{fork,promote,release} custom ops on a paged KV cache (layout and
// bookkeeping: kv_paged.h): their schemas, the argument checks every backend shares, and the CPU
// kernels (bookkeeping, then the block copies; the op bodies are kv_paged_ops.h's).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kv_paged_ops.h"

namespace mahalo {

namespace {

void check_int32(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                 const at::Tensor& cache) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == cache.device(), op, ": ", name, " is on ", t.device(),
                    " but cache is on ", cache.device());
}

}  // namespace

PagedArgs check_paged_args(const char* op, const at::Tensor& cache,
                           const at::Tensor& block_tables, const at::Tensor& lens,
                           const at::Tensor& refcounts, const at::Tensor& free_stack,
                           const at::Tensor& free_state) {
  TORCH_CHECK_VALUE(cache.dim() == 6 && cache.size(1) == 2, op,
                    ": cache must be [L, 2, num_blocks, block_size, n_kv, head_dim], got shape ",
                    cache.sizes());
  const auto dtype = cache.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": cache dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(cache.is_contiguous(), op, ": cache must be contiguous");
  check_int32(op, "block_tables", block_tables, 2, cache);
  check_int32(op, "lens", lens, 1, cache);
  check_int32(op, "refcounts", refcounts, 1, cache);
  check_int32(op, "free_stack", free_stack, 1, cache);
  check_int32(op, "free_state", free_state, 1, cache);
  const int64_t num_blocks = cache.size(2);
  TORCH_CHECK_VALUE(lens.size(0) == block_tables.size(0), op, ": lens has ", lens.size(0),
                    " entries but block_tables has ", block_tables.size(0), " rows (sequences)");
  TORCH_CHECK_VALUE(refcounts.size(0) == num_blocks && free_stack.size(0) == num_blocks, op,
                    ": refcounts and free_stack must have num_blocks = ", num_blocks,
                    " entries, got ", refcounts.size(0), " and ", free_stack.size(0));
  TORCH_CHECK_VALUE(free_state.size(0) == 2, op,
                    ": free_state must be [2] (free blocks, failed allocations), got shape ",
                    free_state.sizes());
  PagedState st{block_tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
                refcounts.data_ptr<int32_t>(),    free_stack.data_ptr<int32_t>(),
                free_state.data_ptr<int32_t>(),   block_tables.size(0),
                block_tables.size(1),             num_blocks,
                cache.size(3)};
  PagedLayout layout{cache.size(0) * 2, num_blocks, cache.size(3),
                     cache.size(4) * cache.size(5) * static_cast<int64_t>(cache.element_size())};
  return PagedArgs{st, layout};
}

void check_paged_index(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       const at::Tensor& cache) {
  check_int32(op, name, t, dim, cache);
}

namespace {

// Below this many bytes in total, waking the thread pool costs more than the copies themselves.
constexpr int64_t kParallelBytes = 1 << 18;

void copy_blocks_cpu(char* base, const PagedLayout& layout, const std::vector<BlockCopy>& copies) {
  const int64_t items = static_cast<int64_t>(copies.size()) * layout.planes;
  const int64_t bytes = items * layout.block_size * layout.token_bytes;
  const int64_t grain = bytes < kParallelBytes ? std::max<int64_t>(items, 1) : 1;
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const BlockCopy& c = copies[w / layout.planes];
      const int64_t plane = w % layout.planes;
      if (!layout.valid(c) || c.lo == c.hi) continue;
      std::memcpy(base + layout.offset(plane, c.dst, c.lo), base + layout.offset(plane, c.src, c.lo),
                  static_cast<size_t>((c.hi - c.lo) * layout.token_bytes));
    }
  });
}

void run_cpu(const char*, const at::Tensor& cache, const PagedArgs& args, int op,
             const int32_t* a, const int32_t* b, const int32_t* c, int64_t num_pairs,
             int64_t group_size) {
  std::vector<BlockCopy> copies(static_cast<size_t>(num_pairs));
  paged_bookkeeping(args.state, op, a, b, c, num_pairs, group_size, copies.data());
  copy_blocks_cpu(static_cast<char*>(cache.data_ptr()), args.layout, copies);
}

}  // namespace

PagedArgs check_fork_args(const at::Tensor& cache, const at::Tensor& block_tables,
                          const at::Tensor& lens, const at::Tensor& refcounts,
                          const at::Tensor& free_stack, const at::Tensor& free_state,
                          const at::Tensor& src, const at::Tensor& dst) {
  const PagedArgs args = check_paged_args("kv_paged_fork", cache, block_tables, lens, refcounts,
                                          free_stack, free_state);
  check_paged_index("kv_paged_fork", "src", src, 1, cache);
  check_paged_index("kv_paged_fork", "dst", dst, 1, cache);
  TORCH_CHECK_VALUE(src.numel() == dst.numel(), "kv_paged_fork: src has ", src.numel(),
                    " entries but dst has ", dst.numel());
  return args;
}

PagedArgs check_promote_args(const at::Tensor& cache, const at::Tensor& block_tables,
                             const at::Tensor& lens, const at::Tensor& refcounts,
                             const at::Tensor& free_stack, const at::Tensor& free_state,
                             const at::Tensor& winners, const at::Tensor& groups,
                             const at::Tensor& start) {
  const PagedArgs args = check_paged_args("kv_paged_promote", cache, block_tables, lens,
                                          refcounts, free_stack, free_state);
  check_paged_index("kv_paged_promote", "winners", winners, 1, cache);
  check_paged_index("kv_paged_promote", "groups", groups, 2, cache);
  check_paged_index("kv_paged_promote", "start", start, 1, cache);
  TORCH_CHECK_VALUE(winners.numel() == groups.size(0) && start.numel() == groups.size(0),
                    "kv_paged_promote: groups has ", groups.size(0), " groups but winners has ",
                    winners.numel(), " and start ", start.numel(), " entries; expected one per group");
  return args;
}

// TORCH_LIBRARY_FRAGMENT: the mahalo library itself is defined in kv_ops.cpp.
TORCH_LIBRARY_FRAGMENT(mahalo, m) {
  // Everything is updated in place and nothing is returned: no host read, no output allocation.
  m.def("kv_paged_fork(Tensor(a!) cache, Tensor(b!) block_tables, Tensor(c!) lens, "
        "Tensor(d!) refcounts, Tensor(e!) free_stack, Tensor(f!) free_state, Tensor src, "
        "Tensor dst) -> ()");
  m.def("kv_paged_promote(Tensor(a!) cache, Tensor(b!) block_tables, Tensor(c!) lens, "
        "Tensor(d!) refcounts, Tensor(e!) free_stack, Tensor(f!) free_state, Tensor winners, "
        "Tensor groups, Tensor start) -> ()");
  m.def("kv_paged_release(Tensor(a!) cache, Tensor(b!) block_tables, Tensor(c!) lens, "
        "Tensor(d!) refcounts, Tensor(e!) free_stack, Tensor(f!) free_state, Tensor seqs) -> ()");
}

TORCH_LIBRARY_IMPL(mahalo, CPU, m) {
  m.impl("kv_paged_fork", &kv_paged_fork<run_cpu>);
  m.impl("kv_paged_promote", &kv_paged_promote<run_cpu>);
  m.impl("kv_paged_release", &kv_paged_release<run_cpu>);
}

}  // namespace mahalo
