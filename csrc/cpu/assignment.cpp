// CPU kernel of fastmerge::linear_assignment: exact dense linear assignment (Jonker-Volgenant) for
// one (n, m) cost matrix or a batch (b, n, m) of small ones (attention heads), same output
// convention as scipy.optimize.linear_sum_assignment.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels/lap.h"

namespace fastmerge {
namespace {

// Copies one problem into a dense double matrix with rows <= cols: transposed when the input has
// more rows than columns, negated for maximisation. Returns false at the first non-finite cost.
template <typename T>
bool load_problem(const T* cost, int64_t rows, int64_t cols, bool transpose, bool maximize, double* out,
                  int64_t* bad_flat) {
  const double sign = maximize ? -1.0 : 1.0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const double v = static_cast<double>(cost[i * cols + j]);
      if (!std::isfinite(v)) {
        *bad_flat = i * cols + j;
        return false;
      }
      if (transpose)
        out[j * rows + i] = sign * v;
      else
        out[i * cols + j] = sign * v;
    }
  return true;
}

std::tuple<at::Tensor, at::Tensor> linear_assignment_cpu(const at::Tensor& cost_in, bool maximize) {
  TORCH_CHECK(cost_in.dim() == 2 || cost_in.dim() == 3,
              "linear_assignment: cost must be (rows, cols) or a batch (batch, rows, cols), got shape ",
              cost_in.sizes());
  TORCH_CHECK(at::isFloatingType(cost_in.scalar_type()), "linear_assignment: cost must be floating point, got ",
              cost_in.scalar_type());
  const bool batched = cost_in.dim() == 3;
  const at::Tensor cost = (batched ? cost_in : cost_in.unsqueeze(0)).contiguous();
  const int64_t batch = cost.size(0), rows = cost.size(1), cols = cost.size(2);
  const int64_t k = std::min(rows, cols);
  const bool transpose = rows > cols;
  const int64_t solve_rows = std::min(rows, cols), solve_cols = std::max(rows, cols);

  at::Tensor row_ind = at::empty({batch, k}, cost.options().dtype(at::kLong));
  at::Tensor col_ind = at::empty({batch, k}, cost.options().dtype(at::kLong));
  int64_t* row_out = row_ind.data_ptr<int64_t>();
  int64_t* col_out = col_ind.data_ptr<int64_t>();
  std::vector<int64_t> bad(batch, -1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "linear_assignment", [&] {
    const scalar_t* data = cost.const_data_ptr<scalar_t>();
    // Small problems: one per thread; one large problem: the solver runs alone.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      kernels::LapSolver solver;
      std::vector<double> dense(static_cast<size_t>(rows * cols));
      std::vector<int64_t> assigned(static_cast<size_t>(solve_rows));
      std::vector<std::pair<int64_t, int64_t>> pairs(static_cast<size_t>(k));
      for (int64_t b = begin; b < end; ++b) {
        if (!load_problem(data + b * rows * cols, rows, cols, transpose, maximize, dense.data(), &bad[b])) continue;
        solver.solve(dense.data(), solve_rows, solve_cols, assigned.data());
        for (int64_t i = 0; i < k; ++i)
          pairs[i] = transpose ? std::make_pair(assigned[i], i) : std::make_pair(i, assigned[i]);
        if (transpose) std::sort(pairs.begin(), pairs.end());
        for (int64_t i = 0; i < k; ++i) {
          row_out[b * k + i] = pairs[i].first;
          col_out[b * k + i] = pairs[i].second;
        }
      }
    });
  });
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(bad[b] < 0, "linear_assignment: cost", batched ? "[" + std::to_string(b) + "]" : std::string(),
                      " has a non-finite entry at (", bad[b] / std::max<int64_t>(cols, 1), ", ",
                      bad[b] % std::max<int64_t>(cols, 1), "); costs must be finite");
  if (!batched) return {row_ind.squeeze(0), col_ind.squeeze(0)};
  return {row_ind, col_ind};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) { m.impl("linear_assignment", &linear_assignment_cpu); }

}  // namespace fastmerge
