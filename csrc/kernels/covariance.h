// Streaming covariance: the per-batch math of the Chan et al. parallel update. Header-only, no torch
// headers (shared by the CPU and CUDA builds).
//
// For a batch X (rows x cols) with batch mean m_b, the running state (n_a, mean_a, M2_a) becomes
//   n = n_a + n_b,  delta = m_b - mean_a,  mean = mean_a + delta * n_b / n,
//   M2 = M2_a + (X - m_b)^T (Y - m_b') + outer(delta_x, delta_y) * n_a * n_b / n.
// Centring each batch *before* its product is what keeps float32 products accurate on post-ReLU
// features, whose mean is large next to their spread (one-pass E[xx^T] - mu mu^T loses the digits).
#pragma once

#include <cmath>
#include <cstdint>

namespace fastmerge {
namespace kernels {

// sums[c] += sum_{r in [row_begin, row_end)} x[r * ld + c], accumulated in double.
template <typename T>
void add_column_sums(const T* x, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols, double* sums) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = x + r * ld;
    for (int64_t c = 0; c < cols; ++c) sums[c] += static_cast<double>(row[c]);
  }
}

// Returns the first column whose sum is not finite (NaN or Inf in the input), or -1.
inline int64_t first_non_finite_column(const double* sums, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c)
    if (!std::isfinite(sums[c])) return c;
  return -1;
}

// out[(r - row_begin) * cols + c] = x[r * ld + c] - mean[c]: the subtraction in double, the result
// rounded once to the compute type.
template <typename T, typename Out>
void centre_rows(const T* x, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols, const double* mean,
                 Out* out) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = x + r * ld;
    Out* o = out + (r - row_begin) * cols;
    for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<Out>(static_cast<double>(row[c]) - mean[c]);
  }
}

// state[i * ld_state + j] += tile[i * ld_tile + j] for a rows x cols tile: the float32 (or float64)
// product of one chunk folded into the float64 state.
template <typename Acc>
void add_tile(const Acc* tile, int64_t ld_tile, int64_t rows, int64_t cols, double* state, int64_t ld_state) {
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* t = tile + i * ld_tile;
    double* s = state + i * ld_state;
    for (int64_t j = 0; j < cols; ++j) s[j] += static_cast<double>(t[j]);
  }
}

// Rows [row_begin, row_end) of the Chan correction, m2 += outer(dx, dy) * factor, for a cross block.
inline void add_outer_rows(const double* dx, const double* dy, double factor, int64_t row_begin, int64_t row_end,
                           int64_t cols, double* m2) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const double a = dx[i] * factor;
    double* s = m2 + i * cols;
    for (int64_t j = 0; j < cols; ++j) s[j] += a * dy[j];
  }
}

// Rows [row_begin, row_end) of a diagonal block: the correction is added to the upper triangle
// (j >= i), which holds the authoritative sums, and copied to the lower triangle, so the state
// stays exactly symmetric although the batch products were only computed for upper tiles.
inline void add_outer_and_mirror_rows(const double* d, double factor, int64_t row_begin, int64_t row_end,
                                      int64_t n, double* m2) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const double a = d[i] * factor;
    double* s = m2 + i * n;
    for (int64_t j = i; j < n; ++j) {
      s[j] += a * d[j];
      m2[j * n + i] = s[j];
    }
  }
}

}  // namespace kernels
}  // namespace fastmerge
