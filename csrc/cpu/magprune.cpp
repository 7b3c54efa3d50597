// CPU kernel of fastmerge::magprune_keep_out: DELLA's keep mask (kernels/magprune.h), parallel over
// rows, each thread with its own radix-sort buffers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels/magprune.h"

namespace fastmerge {
namespace {

template <typename T>
void keep_rows(const at::Tensor& rows, double density, double epsilon, int64_t seed, uint8_t* keep) {
  const T* data = rows.const_data_ptr<T>();
  const int64_t n = rows.size(1);
  // at least ~64k entries per task, so short rows do not pay a buffer allocation each
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows.size(0), grain, [&](int64_t r0, int64_t r1) {
    kernels::RowSortScratch scratch(n);
    for (int64_t r = r0; r < r1; ++r)
      kernels::magprune_keep_row(data + r * n, n, r * n, density, epsilon, static_cast<uint64_t>(seed), scratch,
                                 keep + r * n);
  });
}

void magprune_keep_out_cpu(const at::Tensor& rows, double density, double epsilon, int64_t seed, at::Tensor& keep) {
  const at::ScalarType type = rows.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "magprune_keep_out: rows must be float32, float16 or bfloat16, got ", type);
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.device().is_cpu(),
              "magprune_keep_out: rows must be a contiguous 2-d CPU tensor, got shape ", rows.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.sizes() == rows.sizes() && keep.is_contiguous(),
              "magprune_keep_out: keep must be a contiguous bool tensor of shape ", rows.sizes());
  TORCH_CHECK(rows.size(1) < (int64_t{1} << 32), "magprune_keep_out: rows of 2^32 entries or more are not supported");
  uint8_t* out = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  switch (type) {
    case at::kFloat: keep_rows<float>(rows, density, epsilon, seed, out); break;
    case at::kHalf: keep_rows<at::Half>(rows, density, epsilon, seed, out); break;
    default: keep_rows<at::BFloat16>(rows, density, epsilon, seed, out); break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) { m.impl("magprune_keep_out", &magprune_keep_out_cpu); }

}  // namespace fastmerge
