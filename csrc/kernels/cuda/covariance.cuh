// CUDA kernels of the streaming covariance update (see csrc/kernels/covariance.h for the math):
// centring a batch chunk, folding a product tile into the float64 state with the Chan correction,
// and restoring the symmetry of diagonal blocks. The products themselves run in cuBLAS.
// Header-only, no torch headers.
#pragma once

#include "kernels/cuda/common.cuh"

namespace fastmerge {
namespace cuda_kernels {

constexpr int kCentreThreads = 256;

// out[r * cols + c] = x[r * ld + c] - mean[c] for rows [0, rows): subtraction in double, rounded
// once to the compute type. One block per row at a time (rows can exceed the grid's y limit).
template <typename T, typename Out>
__global__ void __launch_bounds__(kCentreThreads)
    centre_rows_kernel(const T* x, int64_t ld, int64_t rows, int64_t cols, const double* mean, Out* out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * ld;
    Out* o = out + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = store_as<Out>(load_as<double>(row, c) - mean[c]);
  }
}

constexpr int kFoldTile = 32;

// state[i][j] += tile[i][j] (+ factor dl[i] dr[j] when `correct`) for a rows x cols tile at
// (i0, j0) of the state; factor = n_a n_b / (n_a + n_b) with n_a read from the device count, so
// the host never waits for it. Blocks of 32 x 8 threads.
template <typename Acc>
__global__ void fold_tile_kernel(double* state, int64_t ld_state, int64_t i0, int64_t j0, const Acc* tile,
                                 int64_t ld_tile, int64_t rows, int64_t cols, bool correct, const double* dl,
                                 const double* dr, const double* count, double n_b) {
  const double n_a = correct ? *count : 0.0;
  const double factor = correct ? n_a * n_b / (n_a + n_b) : 0.0;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kFoldTile + threadIdx.x;
  if (j >= cols) return;
  const double right = correct ? dr[j0 + j] * factor : 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * kFoldTile + threadIdx.y;
       i < rows && i < (static_cast<int64_t>(blockIdx.y) + 1) * kFoldTile; i += blockDim.y) {
    double add = static_cast<double>(tile[i * ld_tile + j]);
    if (correct) add += dl[i0 + i] * right;
    state[(i0 + i) * ld_state + j0 + j] += add;
  }
}

// m[i][j] = m[j][i] for i > j: the lower triangle copied from the upper one through a shared
// tile, so both the reads and the writes are coalesced. Blocks of 32 x 8 threads over 32 x 32 tiles.
__global__ void mirror_upper_kernel(double* m, int64_t n) {
  __shared__ double tile[kFoldTile][kFoldTile + 1];
  const int64_t bi = blockIdx.y, bj = blockIdx.x;  // destination tile (lower: bi >= bj)
  if (bi < bj) return;
  // read the source tile (rows bj.., cols bi..) of the upper triangle
  for (int64_t r = threadIdx.y; r < kFoldTile; r += blockDim.y) {
    const int64_t i = bj * kFoldTile + r, j = bi * kFoldTile + threadIdx.x;
    if (i < n && j < n) tile[r][threadIdx.x] = m[i * n + j];
  }
  __syncthreads();
  for (int64_t r = threadIdx.y; r < kFoldTile; r += blockDim.y) {
    const int64_t i = bi * kFoldTile + r, j = bj * kFoldTile + threadIdx.x;
    if (i < n && j < n && i > j) m[i * n + j] = tile[threadIdx.x][r];
  }
}

}  // namespace cuda_kernels
}  // namespace fastmerge
