// CUDA kernels of the streaming covariance update (see csrc/kernels/covariance.h for the math):
// shifting a batch chunk by a value close to its mean while summing it (one pass), folding a
// product tile into the float64 state with the rank-one corrections, and restoring the symmetry
// of diagonal blocks. The products themselves run in cuBLAS.
// Header-only, no torch headers.
#pragma once

#include "kernels/cuda/common.cuh"

namespace fastmerge {
namespace cuda_kernels {

constexpr int kCentreThreads = 256;
constexpr int kCentreRows = 256;  // rows per block: one double atomic per column per block

// The shift s that each batch is centred by before its product: the running mean once the state
// has samples (then s is close to the batch mean and the shifted values are small), else the
// batch's first row. Read from the device count, so the host never waits.
// The shift is rounded to the input's type: by Sterbenz's lemma x - s is then exact for every x
// within a factor 2 of s, which for features with a large mean (post-ReLU) is most of them, so the
// shifted values lose nothing even when they are stored in 16 bits.
template <typename T>
__global__ void shift_kernel(const T* x, int64_t cols, const double* mean, const double* count, double* shift) {
  const bool has_samples = *count > 0.0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T rounded = has_samples ? store_as<T>(mean[c]) : x[c];
    shift[c] = load_as<double>(&rounded, 0);
  }
}

// One pass over the batch: out[r * cols + c] = x[r * ld + c] - shift[c] (subtracted in double,
// rounded once to the product's type) and sums[c] += sum_r (x - shift) in double (unrounded), for
// rows [0, rows). The product of the shifted values and these sums give the centred product:
// (X - m)^T (Y - m') = Xs^T Ys - n d d'^T with d = mean(X - s).
template <typename T, typename Out>
__global__ void __launch_bounds__(kCentreThreads)
    shift_rows_kernel(const T* x, int64_t ld, int64_t rows, int64_t cols, const double* shift, double* sums, Out* out) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kCentreRows;
  const int64_t r1 = r0 + kCentreRows < rows ? r0 + kCentreRows : rows;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const double s = shift[c];
    double acc = 0.0;
#pragma unroll 8
    for (int64_t r = r0; r < r1; ++r) {
      const double y = load_as<double>(x + r * ld, c) - s;
      out[r * cols + c] = store_as<Out>(y);
      acc += y;
    }
    atomicAdd(sums + c, acc);
  }
}

// The same with 16-byte loads: each thread takes VEC = 16 / sizeof(T) adjacent columns, so a warp
// moves 512 bytes per instruction instead of 64 (2-byte inputs), which is what lets the pass run
// at memory speed. Needs cols and ld multiples of VEC and 16-byte aligned rows (checked by the caller).
constexpr int kCentreRowsVec = 128;

template <typename U, int N>
struct alignas(sizeof(U) * N) Pack {
  U v[N];
};

template <typename T, typename Out, int VEC>
__global__ void __launch_bounds__(kCentreThreads)
    shift_rows_vec_kernel(const T* x, int64_t ld, int64_t rows, int64_t cols, const double* shift, double* sums,
                          Out* out) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kCentreRowsVec;
  const int64_t r1 = r0 + kCentreRowsVec < rows ? r0 + kCentreRowsVec : rows;
  const int64_t packs = cols / VEC;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const int64_t c = p * VEC;
    double s[VEC], acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s[k] = shift[c + k];
      acc[k] = 0.0;
    }
#pragma unroll 4
    for (int64_t r = r0; r < r1; ++r) {
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + r * ld + c);
      Pack<Out, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const double y = load_as<double>(in.v, k) - s[k];
        o.v[k] = store_as<Out>(y);
        acc[k] += y;
      }
      *reinterpret_cast<Pack<Out, VEC>*>(out + r * cols + c) = o;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(sums + c + k, acc[k]);
  }
}

constexpr int kFoldTile = 32;

// state[i][j] += tile[i][j] for a rows x cols tile at (i0, j0) of the state, plus, when `correct`,
// the two rank-one terms of the update: factor dl[i] dr[j] (Chan: the batch mean's distance from
// the running mean, factor = n_a n_b / (n_a + n_b) with n_a read from the device count) and
// - n_b el[i] er[j] (the tile is a product of shifted values: el = batch mean - shift).
// Blocks of 32 x 8 threads.
template <typename Acc>
__global__ void fold_tile_kernel(double* state, int64_t ld_state, int64_t i0, int64_t j0, const Acc* tile,
                                 int64_t ld_tile, int64_t rows, int64_t cols, bool correct, const double* dl,
                                 const double* dr, const double* el, const double* er, const double* count,
                                 double n_b) {
  const double n_a = correct ? *count : 0.0;
  const double factor = correct ? n_a * n_b / (n_a + n_b) : 0.0;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kFoldTile + threadIdx.x;
  if (j >= cols) return;
  const double right_d = correct ? dr[j0 + j] * factor : 0.0;
  const double right_e = correct ? er[j0 + j] * n_b : 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * kFoldTile + threadIdx.y;
       i < rows && i < (static_cast<int64_t>(blockIdx.y) + 1) * kFoldTile; i += blockDim.y) {
    double add = static_cast<double>(tile[i * ld_tile + j]);
    if (correct) add += dl[i0 + i] * right_d - el[i0 + i] * right_e;
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
