// CUDA kernel of fastmerge::cov_update_: each block shifted by (about) its mean into a scratch
// buffer in the product's precision while its column sums are taken (one pass), the products
// X_l^T X_r in cuBLAS with float32 output (float32 inputs: SGEMM, or TF32 when torch allows it; float16/bfloat16 inputs: tensor-core
// products with float32 accumulation), folded into the float64 state together with the Chan
// correction. Diagonal blocks multiply only their upper tiles and mirror the result.
//
// Nothing waits for the host: the running count stays on the device and the kernels read it. A
// NaN/Inf in the batch is therefore not raised here (that would need a synchronisation per batch);
// it propagates into the state, and CovarianceState raises NonFiniteError when the state is read.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/device_types.h"
#include "kernels/cuda/covariance.cuh"

namespace fastmerge {
namespace {

namespace ck = cuda_kernels;

// Centred copies of all blocks up to this many bytes are made at once (more rows: in chunks).
constexpr int64_t kScratchBytes = int64_t(1) << 30;
// Batches up to this many elements (rows x all units) are multiplied in float64.
constexpr int64_t kSmallBatchElements = int64_t(1) << 20;

// Tiles of a diagonal block: about four per side for float32 products, two for tensor-core ones
// (their GEMMs need to be larger to run at full speed); none below 1024 units.
int64_t symmetric_tile(int64_t n, bool tensor_cores) {
  if (n < 1024) return n;
  const int64_t parts = tensor_cores ? 2 : 4;
  return std::max<int64_t>(512, (n / parts + 127) / 128 * 128);
}

// float32 features are multiplied in float64 where the GPU runs float64 matrix products about as
// fast as float32 ones (data-centre parts with FP64 tensor cores: compute capability 8.0, 9.0,
// 10.0): the state is then exact to float64 rounding at no cost in time. Elsewhere (FP64 at 1/32
// or 1/64 rate) SGEMM, or TF32 when torch allows it. FASTMERGE_COV_PRODUCTS=float|double overrides.
bool fast_fp64(const c10::Device& device) {
  const char* env = std::getenv("FASTMERGE_COV_PRODUCTS");
  if (env != nullptr && std::string(env) == "float") return false;
  if (env != nullptr && std::string(env) == "double") return true;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  return prop->minor == 0 && (prop->major == 8 || prop->major == 9 || prop->major == 10);
}

// The rank-one terms added with the last chunk's products (see fold_tile_kernel).
struct Corrections {
  bool apply;
  at::Tensor delta_left, delta_right;  // batch mean - running mean
  at::Tensor shift_left, shift_right;  // batch mean - shift
};

void fold(at::Tensor& state, int64_t i0, int64_t j0, const at::Tensor& tile, const Corrections& c,
          const at::Tensor& count, double n_b, cudaStream_t stream) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  const dim3 block(ck::kFoldTile, 8);
  const dim3 grid(static_cast<unsigned>((cols + ck::kFoldTile - 1) / ck::kFoldTile),
                  static_cast<unsigned>((rows + ck::kFoldTile - 1) / ck::kFoldTile));
  auto ptr = [&](const at::Tensor& t) { return c.apply ? t.const_data_ptr<double>() : nullptr; };
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "cov_fold_cuda", [&] {
    ck::fold_tile_kernel<scalar_t><<<grid, block, 0, stream>>>(
        state.data_ptr<double>(), state.size(1), i0, j0, tile.const_data_ptr<scalar_t>(), tile.stride(0), rows, cols,
        c.apply, ptr(c.delta_left), ptr(c.delta_right), ptr(c.shift_left), ptr(c.shift_right),
        count.const_data_ptr<double>(), n_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cov_update_cuda(const at::Tensor& count, at::TensorList mean, at::TensorList m2, at::TensorList features,
                     at::IntArrayRef pair_left, at::IntArrayRef pair_right) {
  const int64_t k = static_cast<int64_t>(features.size());
  TORCH_CHECK(k >= 1, "cov_update_: features must hold at least one block");
  TORCH_CHECK(count.scalar_type() == at::kDouble && count.numel() == 1 && count.is_cuda(),
              "cov_update_: count must be a float64 tensor with one element on the features' device");
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == k && pair_left.size() == pair_right.size() &&
                  pair_left.size() == m2.size(),
              "cov_update_: got ", k, " feature blocks, ", mean.size(), " means, ", m2.size(), " states and ",
              pair_left.size(), "/", pair_right.size(), " pair indices");
  const int64_t rows = features[0].dim() == 2 ? features[0].size(0) : -1;
  for (int64_t b = 0; b < k; ++b) {
    const at::Tensor& x = features[b];
    TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && at::isFloatingType(x.scalar_type()), "cov_update_: features[",
                b, "] must be a floating (", rows, ", units) matrix, got ", x.scalar_type(), " of shape ", x.sizes());
    TORCH_CHECK(x.device() == count.device() && mean[b].device() == count.device(), "cov_update_: features[", b,
                "] and mean[", b, "] must be on ", count.device());
    TORCH_CHECK(mean[b].scalar_type() == at::kDouble && mean[b].dim() == 1 && mean[b].size(0) == x.size(1) &&
                    mean[b].is_contiguous(),
                "cov_update_: mean[", b, "] must be a contiguous float64 vector of length ", x.size(1));
  }
  for (size_t p = 0; p < m2.size(); ++p) {
    const int64_t l = pair_left[p], r = pair_right[p];
    TORCH_CHECK(l >= 0 && l < k && r >= 0 && r < k, "cov_update_: pair ", p, " names a block outside [0, ", k, ")");
    TORCH_CHECK(m2[p].scalar_type() == at::kDouble && m2[p].is_contiguous() && m2[p].dim() == 2 &&
                    m2[p].size(0) == features[l].size(1) && m2[p].size(1) == features[r].size(1) &&
                    m2[p].device() == count.device(),
                "cov_update_: m2[", p, "] must be a contiguous float64 (", features[l].size(1), ", ",
                features[r].size(1), ") matrix on ", count.device());
  }
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(count.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Products in float64 for float64 input and for small batches (where they cost nothing and
  // float32 would lose digits, as on the CPU); in the input's own 16-bit type on tensor cores when
  // every block is float16 (or every block bfloat16); in float32 otherwise.
  bool half_inputs = true, any_double = false;
  at::ScalarType half_type = features[0].scalar_type();
  int64_t total_cols = 0;
  for (int64_t b = 0; b < k; ++b) {
    const at::ScalarType t = features[b].scalar_type();
    half_inputs = half_inputs && (t == at::kHalf || t == at::kBFloat16) && t == half_type;
    any_double = any_double || t == at::kDouble;
    total_cols += features[b].size(1);
  }
  const bool small = rows * total_cols <= kSmallBatchElements;
  const bool tensor_cores = half_inputs && !small;
  const bool double_products = any_double || small || (!half_inputs && fast_fp64(count.device()));
  const at::ScalarType compute = double_products ? at::kDouble : (tensor_cores ? half_type : at::kFloat);

  // Each block is shifted by s (the running mean, or the first row of the first batch) while its
  // column sums are taken in the same pass; d = mean(X - s) then turns the product of shifted
  // values into the centred one, and delta = batch mean - running mean is Chan's term.
  std::vector<at::Tensor> x(k), shift(k), sums(k), offset_from_shift(k), delta(k);
  for (int64_t b = 0; b < k; ++b) {
    x[b] = features[b].stride(1) == 1 ? features[b] : features[b].contiguous();
    const int64_t cols = x[b].size(1);
    shift[b] = at::empty({cols}, count.options());
    sums[b] = at::zeros({cols}, count.options());
    if (cols == 0) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x[b].scalar_type(), "cov_shift_cuda", [&] {
      ck::shift_kernel<device_t<scalar_t>><<<grid_for(cols, ck::kCentreThreads), ck::kCentreThreads, 0, stream>>>(
          device_ptr(x[b].const_data_ptr<scalar_t>()), cols, mean[b].const_data_ptr<double>(),
          count.const_data_ptr<double>(), shift[b].data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const int64_t element = at::elementSize(compute);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(rows, kScratchBytes / std::max<int64_t>(1, total_cols * element)));
  at::Tensor scratch = at::empty({chunk * total_cols}, x[0].options().dtype(compute));
  std::vector<at::Tensor> centred(k);
  const double n_b = static_cast<double>(rows);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    const bool last = r1 == rows;
    int64_t offset = 0;
    for (int64_t b = 0; b < k; ++b) {
      const int64_t cols = x[b].size(1);
      centred[b] = scratch.narrow(0, offset, (r1 - r0) * cols).view({r1 - r0, cols});
      offset += (r1 - r0) * cols;
      if (cols == 0) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x[b].scalar_type(), "cov_shift_rows_cuda", [&] {
        using In = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute, "cov_shift_rows_cuda_out", [&] {
          using I = device_t<In>;
          using O = device_t<scalar_t>;
          constexpr int kVec = 16 / sizeof(I);
          const I* src = device_ptr(x[b].const_data_ptr<In>()) + r0 * x[b].stride(0);
          O* dst = device_ptr(centred[b].data_ptr<scalar_t>());
          const int64_t ld = x[b].stride(0);
          const bool packed = cols % kVec == 0 && ld % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                              reinterpret_cast<uintptr_t>(dst) % (sizeof(O) * kVec) == 0;
          if (packed) {
            const unsigned blocks = static_cast<unsigned>((r1 - r0 + ck::kCentreRowsVec - 1) / ck::kCentreRowsVec);
            ck::shift_rows_vec_kernel<I, O, kVec><<<blocks, ck::kCentreThreads, 0, stream>>>(
                src, ld, r1 - r0, cols, shift[b].const_data_ptr<double>(), sums[b].data_ptr<double>(), dst);
          } else {
            const unsigned blocks = static_cast<unsigned>((r1 - r0 + ck::kCentreRows - 1) / ck::kCentreRows);
            ck::shift_rows_kernel<I, O><<<blocks, ck::kCentreThreads, 0, stream>>>(
                src, ld, r1 - r0, cols, shift[b].const_data_ptr<double>(), sums[b].data_ptr<double>(), dst);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
    if (last) {
      for (int64_t b = 0; b < k; ++b) {
        offset_from_shift[b] = sums[b] / n_b;                                 // batch mean - shift
        delta[b] = (shift[b] + offset_from_shift[b]).sub_(mean[b]);           // batch mean - running mean
      }
    }
    for (size_t p = 0; p < m2.size(); ++p) {
      const int64_t l = pair_left[p], r = pair_right[p];
      at::Tensor state = m2[p];
      if (state.numel() == 0) continue;
      auto product = [&](const at::Tensor& a, const at::Tensor& b) {
        return tensor_cores ? at::mm(a.t(), b, at::kFloat) : at::mm(a.t(), b);
      };
      const Corrections corrections{last, delta[l], delta[r], offset_from_shift[l], offset_from_shift[r]};
      if (l != r) {
        fold(state, 0, 0, product(centred[l], centred[r]), corrections, count, n_b, stream);
        continue;
      }
      const int64_t n = centred[l].size(1), tile = symmetric_tile(n, tensor_cores);
      for (int64_t i0 = 0; i0 < n; i0 += tile)
        for (int64_t j0 = i0; j0 < n; j0 += tile) {
          const int64_t bi = std::min(tile, n - i0), bj = std::min(tile, n - j0);
          fold(state, i0, j0, product(centred[l].narrow(1, i0, bi), centred[l].narrow(1, j0, bj)), corrections, count,
               n_b, stream);
        }
      {  // the GEMM of a diagonal tile is not exactly symmetric either: mirror everything
        const dim3 grid(static_cast<unsigned>((n + ck::kFoldTile - 1) / ck::kFoldTile),
                        static_cast<unsigned>((n + ck::kFoldTile - 1) / ck::kFoldTile));
        ck::mirror_upper_kernel<<<grid, dim3(ck::kFoldTile, 8), 0, stream>>>(state.data_ptr<double>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
  // Means and count last: the folds above read the old count.
  for (int64_t b = 0; b < k; ++b) {
    at::Tensor mu = mean[b];
    mu.add_(delta[b] * (n_b / (count + n_b)));
  }
  at::Tensor c = count;
  c.add_(n_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CUDA, m) { m.impl("cov_update_", &cov_update_cuda); }

}  // namespace fastmerge
