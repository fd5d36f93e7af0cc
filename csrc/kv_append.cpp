// The mahalo::kv_append_ranges custom op: schema, argument checks every backend shares, and the CPU
// kernel. For each pair p: dst[:, :, dst_slot[p], :, dst_start[p] : dst_start[p] + count[p]] =
// src[:, :, src_slot[p], :, 0 : count[p]] -- committing a candidate's step tokens (a short slot of
// the candidate cache) to the end of its request's prefix slot, for all requests in one launch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "kv_append_ops.h"

namespace mahalo {

AppendLayout check_kv_append_args(const at::Tensor& dst, const at::Tensor& src,
                                  const at::Tensor& src_slot, const at::Tensor& dst_slot,
                                  const at::Tensor& dst_start, const at::Tensor& count) {
  for (const auto& [name, t] : std::array<std::pair<const char*, const at::Tensor*>, 2>{
           {{"dst", &dst}, {"src", &src}}}) {
    TORCH_CHECK_VALUE(t->dim() == 6 && t->size(1) == 2, "kv_append_ranges: ", name,
                      " must be [L, 2, S, n_kv, T, head_dim], got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->is_contiguous(), "kv_append_ranges: ", name, " must be contiguous");
  }
  const auto dtype = dst.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "kv_append_ranges: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(src.scalar_type() == dtype, "kv_append_ranges: src dtype ", src.scalar_type(),
                    " differs from dst's ", dtype);
  TORCH_CHECK_VALUE(src.device() == dst.device(), "kv_append_ranges: src is on ", src.device(),
                    " but dst is on ", dst.device());
  TORCH_CHECK_VALUE(src.size(0) == dst.size(0) && src.size(3) == dst.size(3) &&
                        src.size(5) == dst.size(5),
                    "kv_append_ranges: src ", src.sizes(), " and dst ", dst.sizes(),
                    " must share L, n_kv and head_dim");
  TORCH_CHECK_VALUE(src.data_ptr() != dst.data_ptr(),
                    "kv_append_ranges: src and dst must be different caches");
  const std::array<std::pair<const char*, const at::Tensor*>, 4> indices = {
      {{"src_slot", &src_slot}, {"dst_slot", &dst_slot}, {"dst_start", &dst_start},
       {"count", &count}}};
  for (const auto& [name, t] : indices) {
    TORCH_CHECK_VALUE(t->dim() == 1, "kv_append_ranges: ", name, " must be 1-D, got shape ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == src_slot.scalar_type() &&
                          (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong),
                      "kv_append_ranges: ", name, " has dtype ", t->scalar_type(),
                      "; all index tensors must be int32 or all int64");
    TORCH_CHECK_VALUE(t->numel() == src_slot.numel(), "kv_append_ranges: ", name, " has ",
                      t->numel(), " entries but src_slot has ", src_slot.numel());
    TORCH_CHECK_VALUE(t->device() == dst.device(), "kv_append_ranges: ", name, " is on ",
                      t->device(), " but dst is on ", dst.device());
  }
  return AppendLayout{dst.size(0) * 2, dst.size(3),
                      dst.size(5) * static_cast<int64_t>(dst.element_size()),
                      src.size(2), src.size(4), dst.size(2), dst.size(4)};
}

namespace {

template <typename Index>
void append_ranges_cpu(char* dst, const char* src, const PairIndex& pairs, int64_t num_pairs,
                       const AppendLayout& layout) {
  const int64_t rows = layout.rows();
  // Candidate steps are short: parallelise over (pair, row) only when there is real volume.
  const int64_t items = num_pairs * rows;
  const int64_t grain = items * layout.src_len * layout.token_bytes < (1 << 18)
                            ? std::max<int64_t>(items, 1) : 1;
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const int64_t p = w / rows;
      const int64_t r = w - p * rows;
      const int64_t s = pairs.get<Index>(kAppendSrc, p), d = pairs.get<Index>(kAppendDst, p);
      const int64_t a = pairs.get<Index>(kAppendStart, p), n = pairs.get<Index>(kAppendCount, p);
      if (!layout.in_bounds(s, d, a, n) || n == 0) continue;
      std::memcpy(dst + layout.offset(r, d, layout.dst_slots, layout.dst_len) + a * layout.token_bytes,
                  src + layout.offset(r, s, layout.src_slots, layout.src_len),
                  static_cast<size_t>(n * layout.token_bytes));
    }
  });
}

void kv_append_ranges_cpu(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& src_slot,
                          const at::Tensor& dst_slot, const at::Tensor& dst_start,
                          const at::Tensor& count) {
  const AppendLayout layout = check_kv_append_args(dst, src, src_slot, dst_slot, dst_start, count);
  const PairIndex pairs = pair_index(src_slot, dst_slot, dst_start, count);
  AT_DISPATCH_INDEX_TYPES(src_slot.scalar_type(), "kv_append_ranges_cpu", [&] {
    append_ranges_cpu<index_t>(static_cast<char*>(dst.data_ptr()),
                               static_cast<const char*>(src.const_data_ptr()), pairs,
                               src_slot.numel(), layout);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mahalo, m) {
  m.def("kv_append_ranges(Tensor(a!) dst, Tensor src, Tensor src_slot, Tensor dst_slot, "
        "Tensor dst_start, Tensor count) -> ()");
}

TORCH_LIBRARY_IMPL(mahalo, CPU, m) { m.impl("kv_append_ranges", &kv_append_ranges_cpu); }

}  // namespace mahalo
