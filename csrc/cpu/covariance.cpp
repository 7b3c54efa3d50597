// CPU kernel of fastmerge::cov_update_: one batch of features for k blocks (one per model) folded
// into the float64 streaming state (count, means, centred second moments of the kept block pairs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/scratch.h"
#include "kernels/covariance.h"

namespace fastmerge {
namespace {

// Rows per product: large enough for the GEMM to run at full speed, small enough that the centred
// copy of the batch stays a few tens of MB and each float32 partial sum stays short.
constexpr int64_t kRowChunk = 8192;
// A diagonal block X^T X is symmetric: only its upper tiles are multiplied, which saves up to half
// the flops. About four tiles per side, 128 to 512 wide, measured best on 2 cores (8192 rows):
// 1.3x over one full GEMM at C = 512, 1.5x at C = 1024 and 2048.
int64_t symmetric_tile(int64_t n) {
  if (n < 256) return n;
  const int64_t quarter = ((n / 4 + 63) / 64) * 64;
  return std::min<int64_t>(512, std::max<int64_t>(128, quarter));
}

// Batches up to this many elements (rows x all units) are multiplied in float64.
constexpr int64_t kSmallBatchElements = int64_t(1) << 20;

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

void check_inputs(const at::Tensor& count, at::TensorList mean, at::TensorList m2, at::TensorList features,
                  at::IntArrayRef pair_left, at::IntArrayRef pair_right) {
  TORCH_CHECK(count.scalar_type() == at::kDouble && count.numel() == 1,
              "cov_update_: count must be a float64 tensor with one element, got ", count.scalar_type(), " of shape ",
              count.sizes());
  const int64_t k = static_cast<int64_t>(features.size());
  TORCH_CHECK(k >= 1, "cov_update_: features must hold at least one block");
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == k, "cov_update_: got ", k, " feature blocks but ", mean.size(),
              " mean vectors");
  TORCH_CHECK(pair_left.size() == pair_right.size() && pair_left.size() == m2.size(),
              "cov_update_: pair_left, pair_right and m2 must have the same length, got ", pair_left.size(), ", ",
              pair_right.size(), " and ", m2.size());
  const int64_t rows = features[0].dim() == 2 ? features[0].size(0) : -1;
  for (int64_t b = 0; b < k; ++b) {
    const at::Tensor& x = features[b];
    TORCH_CHECK(x.dim() == 2, "cov_update_: features[", b, "] must be 2-D (samples, units), got shape ", x.sizes());
    TORCH_CHECK(x.size(0) == rows, "cov_update_: every block must have the same number of samples; features[0] has ",
                rows, " and features[", b, "] has ", x.size(0));
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), "cov_update_: features[", b, "] must be floating point, got ",
                x.scalar_type());
    TORCH_CHECK(mean[b].scalar_type() == at::kDouble && mean[b].dim() == 1 && mean[b].size(0) == x.size(1) &&
                    mean[b].is_contiguous(),
                "cov_update_: mean[", b, "] must be a contiguous float64 vector of length ", x.size(1), ", got ",
                mean[b].scalar_type(), " of shape ", mean[b].sizes());
  }
  for (size_t p = 0; p < m2.size(); ++p) {
    const int64_t l = pair_left[p], r = pair_right[p];
    TORCH_CHECK(l >= 0 && l < k && r >= 0 && r < k, "cov_update_: pair ", p, " = (", l, ", ", r,
                ") names a block outside [0, ", k, ")");
    TORCH_CHECK(m2[p].scalar_type() == at::kDouble && m2[p].is_contiguous() && m2[p].dim() == 2 &&
                    m2[p].size(0) == features[l].size(1) && m2[p].size(1) == features[r].size(1),
                "cov_update_: m2[", p, "] must be a contiguous float64 matrix of shape (", features[l].size(1), ", ",
                features[r].size(1), "), got ", m2[p].scalar_type(), " of shape ", m2[p].sizes());
  }
}

// Column means of one block in double, with a loud failure on NaN/Inf (never zeroed).
std::vector<double> batch_mean(const at::Tensor& x, int64_t block) {
  const int64_t rows = x.size(0), cols = x.size(1), ld = x.stride(0);
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * cols, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cov_update_mean", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      double* sums = partial.data() + static_cast<size_t>(at::get_thread_num()) * cols;
      kernels::add_column_sums(data, ld, begin, end, cols, sums);
    });
  });
  std::vector<double> mean(cols, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < cols; ++c) mean[c] += partial[static_cast<size_t>(t) * cols + c];
  const int64_t bad = kernels::first_non_finite_column(mean.data(), cols);
  TORCH_CHECK_VALUE(bad < 0, "cov_update_: non-finite value (NaN or Inf) in features[", block, "], unit ", bad,
                    "; statistics are never computed over non-finite activations (check the model's weights and "
                    "the input batch, and capture in float32 rather than float16)");
  for (int64_t c = 0; c < cols; ++c) mean[c] /= static_cast<double>(rows);
  return mean;
}

// Centres rows [r0, r1) of one block into `out` (contiguous, compute dtype).
void centre_chunk(const at::Tensor& x, const std::vector<double>& mean, int64_t r0, int64_t r1, at::Tensor& out) {
  const int64_t cols = x.size(1), ld = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cov_update_centre", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "cov_update_centre_out", [&] {
      using out_t = scalar_t;
      out_t* dst = out.data_ptr<out_t>();
      at::parallel_for(r0, r1, grain_rows(cols), [&](int64_t begin, int64_t end) {
        kernels::centre_rows(data, ld, begin, end, cols, mean.data(), dst + (begin - r0) * cols);
      });
    });
  });
}

// m2[rows i0.., cols j0..] += product (a tile computed in the compute dtype).
void fold_tile(const at::Tensor& product, at::Tensor& m2, int64_t i0, int64_t j0) {
  const int64_t rows = product.size(0), cols = product.size(1), ld_state = m2.size(1);
  double* state = m2.data_ptr<double>() + i0 * ld_state + j0;
  AT_DISPATCH_FLOATING_TYPES(product.scalar_type(), "cov_update_fold", [&] {
    const scalar_t* tile = product.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      kernels::add_tile(tile + begin * cols, cols, end - begin, cols, state + begin * ld_state, ld_state);
    });
  });
}

void accumulate_products(const std::vector<at::Tensor>& centred, at::Tensor& m2, int64_t l, int64_t r) {
  const at::Tensor& xl = centred[l];
  const at::Tensor& xr = centred[r];
  if (l != r) {
    fold_tile(at::mm(xl.t(), xr), m2, 0, 0);
    return;
  }
  const int64_t n = xl.size(1);
  const int64_t tile = symmetric_tile(n);
  for (int64_t i0 = 0; i0 < n; i0 += tile) {
    const int64_t bi = std::min(tile, n - i0);
    for (int64_t j0 = i0; j0 < n; j0 += tile) {
      const int64_t bj = std::min(tile, n - j0);
      fold_tile(at::mm(xl.narrow(1, i0, bi).t(), xl.narrow(1, j0, bj)), m2, i0, j0);
    }
  }
}

void cov_update_cpu(const at::Tensor& count, at::TensorList mean, at::TensorList m2, at::TensorList features,
                    at::IntArrayRef pair_left, at::IntArrayRef pair_right) {
  check_inputs(count, mean, m2, features, pair_left, pair_right);
  const int64_t k = static_cast<int64_t>(features.size());
  const int64_t rows = features[0].size(0);
  if (rows == 0) return;

  bool any_double = false;
  int64_t total_cols = 0;
  std::vector<at::Tensor> x(k);
  for (int64_t b = 0; b < k; ++b) {
    // Any row stride is fine; the unit axis must be dense for the row loops.
    x[b] = features[b].stride(1) == 1 ? features[b] : features[b].contiguous();
    any_double = any_double || x[b].scalar_type() == at::kDouble;
    total_cols += x[b].size(1);
  }
  // Products run in float32 (2x the speed of float64) unless an input is float64 or the batch is
  // small: BLAS sums small products sequentially, which costs float32 ~1e-6 relative error at a few
  // hundred rows, while a float64 product of that size is nearly free.
  const bool small = rows * total_cols <= kSmallBatchElements;
  const at::ScalarType compute = (any_double || small) ? at::kDouble : at::kFloat;

  std::vector<std::vector<double>> batch_means(k);
  for (int64_t b = 0; b < k; ++b) batch_means[b] = batch_mean(x[b], b);

  // The centred chunk of every block lives in one per-thread scratch buffer, reused across calls.
  const int64_t chunk = std::min(kRowChunk, rows);
  const size_t scratch_elements = static_cast<size_t>(chunk * total_cols);
  std::vector<float> one_off_f;
  std::vector<double> one_off_d;
  void* scratch = compute == at::kDouble ? static_cast<void*>(retained_scratch<double>(scratch_elements, one_off_d))
                                         : static_cast<void*>(retained_scratch<float>(scratch_elements, one_off_f));
  const auto options = at::TensorOptions().dtype(compute);
  std::vector<at::Tensor> centred(k);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    int64_t offset = 0;
    for (int64_t b = 0; b < k; ++b) {
      char* base = static_cast<char*>(scratch) + offset * at::elementSize(compute);
      centred[b] = at::from_blob(base, {r1 - r0, x[b].size(1)}, options);
      offset += (r1 - r0) * x[b].size(1);
      centre_chunk(x[b], batch_means[b], r0, r1, centred[b]);
    }
    for (size_t p = 0; p < m2.size(); ++p) {
      at::Tensor state = m2[p];
      accumulate_products(centred, state, pair_left[p], pair_right[p]);
    }
  }

  // Chan merge of the batch into the running state.
  double* count_ptr = count.data_ptr<double>();
  const double n_a = *count_ptr, n_b = static_cast<double>(rows), n = n_a + n_b;
  const double factor = n_a * n_b / n;
  std::vector<std::vector<double>> delta(k);
  for (int64_t b = 0; b < k; ++b) {
    const double* old_mean = mean[b].const_data_ptr<double>();
    delta[b].resize(batch_means[b].size());
    for (size_t c = 0; c < delta[b].size(); ++c) delta[b][c] = batch_means[b][c] - old_mean[c];
  }
  for (size_t p = 0; p < m2.size(); ++p) {
    const int64_t l = pair_left[p], r = pair_right[p];
    double* state = m2[p].data_ptr<double>();
    const int64_t nl = m2[p].size(0), nr = m2[p].size(1);
    at::parallel_for(0, nl, grain_rows(nr), [&](int64_t begin, int64_t end) {
      if (l == r)
        kernels::add_outer_and_mirror_rows(delta[l].data(), factor, begin, end, nl, state);
      else
        kernels::add_outer_rows(delta[l].data(), delta[r].data(), factor, begin, end, nr, state);
    });
  }
  for (int64_t b = 0; b < k; ++b) {
    double* mu = mean[b].data_ptr<double>();
    for (size_t c = 0; c < delta[b].size(); ++c) mu[c] += delta[b][c] * (n_b / n);
  }
  *count_ptr = n;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) { m.impl("cov_update_", &cov_update_cpu); }

}  // namespace fastmerge
