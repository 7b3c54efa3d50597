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
#include <type_traits>
#include <vector>

#include "cpu/scratch.h"
#include "kernels/lap.h"

namespace fastmerge {
namespace {

// Index of the first non-finite entry of cost[0, n), or -1. The common all-finite case is one
// vectorisable pass: x - x is 0 for finite x and NaN for NaN/Inf, and a NaN survives the sum.
template <typename T>
int64_t first_non_finite_entry(const T* cost, int64_t n) {
  double probe = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(cost[i]);
    probe += v - v;
  }
  if (probe == 0.0) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(cost[i]))) return i;
  return -1;
}

// Copies one problem into a dense double matrix with rows <= cols: transposed when the input has
// more rows than columns, negated for maximisation.
template <typename T>
void load_problem(const T* cost, int64_t rows, int64_t cols, bool transpose, bool maximize, double* out) {
  const double sign = maximize ? -1.0 : 1.0;
  if (!transpose) {
    for (int64_t i = 0; i < rows * cols; ++i) out[i] = sign * static_cast<double>(cost[i]);
    return;
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = sign * static_cast<double>(cost[i * cols + j]);
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
    // float64 input that needs neither transposing nor negating is solved where it lies.
    const bool in_place = std::is_same<scalar_t, double>::value && !transpose && !maximize;
    // Small problems: one per thread; one large problem: the solver runs alone.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      kernels::LapSolver solver;
      std::vector<double> one_off;
      std::vector<int64_t> assigned(static_cast<size_t>(solve_rows));
      std::vector<std::pair<int64_t, int64_t>> pairs(static_cast<size_t>(k));
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* problem = data + b * rows * cols;
        bad[b] = first_non_finite_entry(problem, rows * cols);
        if (bad[b] >= 0) continue;
        const double* dense;
        if (in_place) {
          dense = reinterpret_cast<const double*>(problem);  // scalar_t is double here
        } else {
          // Weight matching solves the same large sizes again and again: a single problem (solved
          // on the calling thread) reuses that thread's scratch; batches of small problems on
          // worker threads use their own short-lived buffers, so workers never pin memory.
          const size_t elements = static_cast<size_t>(rows * cols);
          double* scratch = nullptr;
          if (batch == 1) {
            scratch = retained_scratch<double>(elements, one_off);
          } else {
            one_off.resize(elements);
            scratch = one_off.data();
          }
          load_problem(problem, rows, cols, transpose, maximize, scratch);
          dense = scratch;
        }
        solver.solve(dense, solve_rows, solve_cols, assigned.data());
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
