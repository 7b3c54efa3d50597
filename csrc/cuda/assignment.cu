// CUDA kernel of fastmerge::linear_assignment: exact JV on the GPU (csrc/kernels/cuda/lap.cuh), one
// thread block per problem; the same output convention as the CPU kernel and SciPy.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "kernels/cuda/lap.cuh"

namespace fastmerge {
namespace {

namespace ck = cuda_kernels;

int threads_for(int64_t cols) {
  if (cols > 2048) return 1024;
  if (cols > 512) return 512;
  if (cols > 128) return 256;
  return 128;
}

std::tuple<at::Tensor, at::Tensor> linear_assignment_cuda(const at::Tensor& cost_in, bool maximize) {
  TORCH_CHECK(cost_in.dim() == 2 || cost_in.dim() == 3,
              "linear_assignment: cost must be (rows, cols) or a batch (batch, rows, cols), got shape ", cost_in.sizes());
  TORCH_CHECK(at::isFloatingType(cost_in.scalar_type()), "linear_assignment: cost must be floating point, got ",
              cost_in.scalar_type());
  TORCH_CHECK(cost_in.size(-1) < INT_MAX && cost_in.size(-2) < INT_MAX, "linear_assignment: problem too large");
  const c10::cuda::CUDAGuard guard(cost_in.device());
  const bool batched = cost_in.dim() == 3;
  at::Tensor cost = batched ? cost_in : cost_in.unsqueeze(0);
  const int64_t batch = cost.size(0), rows = cost.size(1), cols = cost.size(2);
  const int64_t k = std::min(rows, cols);
  // One synchronisation per call: the answer is needed anyway, and a NaN would never terminate.
  const at::Tensor bad = at::isfinite(cost).logical_not().flatten();
  if (bad.numel() > 0 && bad.any().item<bool>()) {
    const int64_t flat = bad.to(at::kInt).argmax().item<int64_t>();  // the first non-finite entry
    const int64_t b = flat / (rows * cols), i = flat / cols % rows, j = flat % cols;
    TORCH_CHECK_VALUE(false, "linear_assignment: cost", batched ? "[" + std::to_string(b) + "]" : std::string(),
                      " has a non-finite entry at (", i, ", ", j, "); costs must be finite");
  }
  at::Tensor row_ind = at::empty({batch, k}, cost.options().dtype(at::kLong));
  at::Tensor col_ind = at::empty({batch, k}, cost.options().dtype(at::kLong));
  if (batch > 0 && k > 0) {
    const bool transpose = rows > cols;
    at::Tensor problem = cost.to(at::kDouble);
    if (maximize) problem = -problem;
    if (transpose) problem = problem.transpose(1, 2);
    problem = problem.contiguous();
    const int64_t solve_rows = std::min(rows, cols), solve_cols = std::max(rows, cols);
    const int64_t state_bytes = ck::lap_state_bytes(solve_rows, solve_cols);
    const int64_t shared_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - 2048;
    const bool use_shared = state_bytes <= shared_limit;
    at::Tensor workspace = use_shared ? at::empty({0}, cost.options().dtype(at::kByte))
                                      : at::empty({batch * state_bytes}, cost.options().dtype(at::kByte));
    at::Tensor assigned = at::empty({batch, solve_rows}, cost.options().dtype(at::kLong));
    const int shared = use_shared ? static_cast<int>(state_bytes) : 0;
    if (shared > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(ck::lap_solve_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    ck::lap_solve_kernel<<<static_cast<unsigned>(batch), threads_for(solve_cols), shared,
                           at::cuda::getCurrentCUDAStream()>>>(
        problem.const_data_ptr<double>(), static_cast<int>(solve_rows), static_cast<int>(solve_cols), use_shared,
        use_shared ? nullptr : static_cast<char*>(workspace.data_ptr()), assigned.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!transpose) {
      row_ind.copy_(at::arange(k, cost.options().dtype(at::kLong)).expand({batch, k}));
      col_ind.copy_(assigned);
    } else {
      // assigned[b, j] is the row of column j: sorted by row, as SciPy returns it.
      auto [rows_sorted, order] = assigned.sort(1);
      row_ind.copy_(rows_sorted);
      col_ind.copy_(order);
    }
  }
  if (!batched) return {row_ind.squeeze(0), col_ind.squeeze(0)};
  return {row_ind, col_ind};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CUDA, m) { m.impl("linear_assignment", &linear_assignment_cuda); }

}  // namespace fastmerge
