// The mahalo::kv_copy_ranges custom op: its schema, the argument checks every backend shares, the
// CPU kernel (at::parallel_for over (pair, layer*2*n_kv) rows), and the Python module entry point
// of mahalo_engine._C (importing it registers the op; it holds no Python functions).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "kv_ops.h"

namespace mahalo {

KVLayout check_kv_copy_args(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& dst,
                            const at::Tensor& start, const at::Tensor& end) {
  TORCH_CHECK_VALUE(cache.dim() == 6 && cache.size(1) == 2,
                    "kv_copy_ranges: cache must be [L, 2, S, n_kv, T_max, head_dim], got shape ",
                    cache.sizes());
  const auto dtype = cache.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "kv_copy_ranges: cache dtype must be float32, bfloat16 or float16, got ",
                    dtype);
  TORCH_CHECK_VALUE(cache.is_contiguous(), "kv_copy_ranges: cache must be contiguous");
  const std::array<std::pair<const char*, const at::Tensor*>, 4> indices = {
      {{"src", &src}, {"dst", &dst}, {"start", &start}, {"end", &end}}};
  for (const auto& [name, t] : indices) {
    TORCH_CHECK_VALUE(t->dim() == 1, "kv_copy_ranges: ", name, " must be 1-D, got shape ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                      "kv_copy_ranges: ", name, " must be int32 or int64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->scalar_type() == src.scalar_type(), "kv_copy_ranges: ", name,
                      " has dtype ", t->scalar_type(), " but src has ", src.scalar_type(),
                      "; all index tensors must share one dtype");
    TORCH_CHECK_VALUE(t->numel() == src.numel(), "kv_copy_ranges: ", name, " has ", t->numel(),
                      " entries but src has ", src.numel());
    TORCH_CHECK_VALUE(t->device() == cache.device(), "kv_copy_ranges: ", name, " is on ",
                      t->device(), " but cache is on ", cache.device());
  }
  return KVLayout{cache.size(0) * 2, cache.size(2), cache.size(3), cache.size(4),
                  cache.size(5) * static_cast<int64_t>(cache.element_size())};
}

PairIndex pair_index(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& start,
                     const at::Tensor& end) {
  return PairIndex{{src.const_data_ptr(), dst.const_data_ptr(), start.const_data_ptr(),
                    end.const_data_ptr()},
                   {src.stride(0), dst.stride(0), start.stride(0), end.stride(0)}};
}

namespace {

// Below this many bytes in total, waking the thread pool costs more than the copy itself.
constexpr int64_t kParallelBytes = 1 << 18;

template <typename Index>
void copy_ranges_cpu(char* base, const PairIndex& pairs, int64_t num_pairs,
                     const KVLayout& layout) {
  const int64_t rows = layout.rows();
  int64_t total_bytes = 0;
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t a = pairs.get<Index>(kStart, p), b = pairs.get<Index>(kEnd, p);
    if (layout.in_bounds(pairs.get<Index>(kSrc, p), pairs.get<Index>(kDst, p), a, b)) {
      total_bytes += (b - a) * layout.token_bytes * rows;
    }
  }
  const int64_t items = num_pairs * rows;
  const int64_t grain = total_bytes < kParallelBytes ? std::max<int64_t>(items, 1) : 1;
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const int64_t p = w / rows;
      const int64_t r = w - p * rows;
      const int64_t s = pairs.get<Index>(kSrc, p), d = pairs.get<Index>(kDst, p);
      const int64_t a = pairs.get<Index>(kStart, p), b = pairs.get<Index>(kEnd, p);
      if (!layout.in_bounds(s, d, a, b) || a == b) continue;
      const int64_t skip = a * layout.token_bytes;
      std::memcpy(base + layout.row_offset(r, d) + skip, base + layout.row_offset(r, s) + skip,
                  static_cast<size_t>((b - a) * layout.token_bytes));
    }
  });
}

void kv_copy_ranges_cpu(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& dst,
                        const at::Tensor& start, const at::Tensor& end) {
  const KVLayout layout = check_kv_copy_args(cache, src, dst, start, end);
  const PairIndex pairs = pair_index(src, dst, start, end);
  AT_DISPATCH_INDEX_TYPES(src.scalar_type(), "kv_copy_ranges_cpu", [&] {
    copy_ranges_cpu<index_t>(static_cast<char*>(cache.data_ptr()), pairs, src.numel(), layout);
  });
}

}  // namespace

TORCH_LIBRARY(mahalo, m) {
  // cache is mutated in place and nothing is returned: no allocation on any backend.
  m.def("kv_copy_ranges(Tensor(a!) cache, Tensor src, Tensor dst, Tensor start, Tensor end) -> ()");
}

TORCH_LIBRARY_IMPL(mahalo, CPU, m) { m.impl("kv_copy_ranges", &kv_copy_ranges_cpu); }

}  // namespace mahalo

PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "Registers torch.ops.mahalo.* (batched KV-cache copies).", -1,
                               nullptr};
  return PyModule_Create(&module);
}
