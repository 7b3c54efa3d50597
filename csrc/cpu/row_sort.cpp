// CPU kernel of fastmerge::magnitude_order_statistics: chosen order statistics of every row's
// magnitudes (kernels/row_sort.h), parallel over rows, each thread with its own radix-sort buffers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "kernels/row_sort.h"

namespace fastmerge {
namespace {

template <typename T>
void order_statistics(const at::Tensor& rows, const std::vector<int64_t>& positions, at::Tensor& out,
                      at::Tensor* squares) {
  const T* data = rows.const_data_ptr<T>();
  T* result = out.data_ptr<T>();
  double* row_squares = squares != nullptr ? squares->data_ptr<double>() : nullptr;
  const int64_t n = rows.size(1);
  const int64_t count = static_cast<int64_t>(positions.size());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows.size(0), grain, [&](int64_t r0, int64_t r1) {
    kernels::RowSortScratch scratch(n);
    std::vector<uint32_t> bits(static_cast<size_t>(count));
    for (int64_t r = r0; r < r1; ++r) {
      kernels::magnitude_order_statistics(data + r * n, n, positions.data(), count, scratch, bits.data(),
                                          row_squares != nullptr ? row_squares + r : nullptr);
      for (int64_t j = 0; j < count; ++j) {  // the key is the magnitude's bit pattern in T's width
        if constexpr (sizeof(T) == 4) {
          std::memcpy(result + r * count + j, &bits[j], 4);
        } else {
          const uint16_t half = static_cast<uint16_t>(bits[j]);
          std::memcpy(result + r * count + j, &half, 2);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> order_statistics_cpu(const at::Tensor& rows, at::IntArrayRef positions,
                                                        bool with_squares, const char* op) {
  const at::ScalarType type = rows.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op,
              ": rows must be float32, float16 or bfloat16, got ", type);
  TORCH_CHECK(rows.dim() == 2 && rows.device().is_cpu(), op, ": rows must be a 2-d CPU tensor, got shape ",
              rows.sizes());
  const int64_t n = rows.size(1);
  TORCH_CHECK(n < (int64_t{1} << 32), op, ": rows of 2^32 entries or more are not supported");
  for (int64_t p : positions) TORCH_CHECK(p >= 0 && p < n, op, ": position ", p, " is outside a row of ", n, " entries");
  const at::Tensor contiguous = rows.contiguous();
  at::Tensor out = at::empty({rows.size(0), static_cast<int64_t>(positions.size())}, rows.options());
  at::Tensor squares = at::zeros({with_squares ? rows.size(0) : 0}, rows.options().dtype(at::kDouble));
  at::Tensor* squares_out = with_squares ? &squares : nullptr;
  const std::vector<int64_t> pos(positions.begin(), positions.end());
  if (rows.size(0) == 0 || (positions.empty() && !with_squares)) return {out, squares};
  switch (type) {
    case at::kFloat: order_statistics<float>(contiguous, pos, out, squares_out); break;
    case at::kHalf: order_statistics<at::Half>(contiguous, pos, out, squares_out); break;
    default: order_statistics<at::BFloat16>(contiguous, pos, out, squares_out); break;
  }
  return {out, squares};
}

at::Tensor magnitude_order_statistics_cpu(const at::Tensor& rows, at::IntArrayRef positions) {
  return std::get<0>(order_statistics_cpu(rows, positions, false, "magnitude_order_statistics"));
}

std::tuple<at::Tensor, at::Tensor> magnitude_signature_cpu(const at::Tensor& rows, at::IntArrayRef positions) {
  return order_statistics_cpu(rows, positions, true, "magnitude_signature");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) {
  m.impl("magnitude_order_statistics", &magnitude_order_statistics_cpu);
  m.impl("magnitude_signature", &magnitude_signature_cpu);
}

}  // namespace fastmerge
