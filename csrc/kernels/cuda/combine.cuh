// CUDA kernels of the weighted combination (out = sum_j c_j w_j), of two-parent NP Merge
// (out = sigmoid(l) a + (1 - sigmoid(l)) b) and of their coefficient gradients. Header-only, no
// torch headers (csrc/cuda/*.cu launch them; nvcc compile-checks this file alone in CI).
//
// Coefficients broadcast along trailing axes as in the CPU kernels: one value per run of `inner`
// consecutive elements (inner = 1: per entry; inner = numel: per tensor). The arithmetic order
// matches the CPU kernels (each product rounded, summed left to right), so both backends give the
// same bits for the same inputs.
#pragma once

#include "kernels/cuda/common.cuh"

namespace fastmerge {
namespace cuda_kernels {

constexpr int kMaxModels = 16;
constexpr int kElementwiseThreads = 256;

// One tensor's operands, passed by value (a few hundred bytes of kernel arguments).
template <typename T, typename C>
struct CombineArgs {
  const T* weight[kMaxModels];
  const C* coef[kMaxModels];  // nullptr: scalar[m] for every element
  double scalar[kMaxModels];
  int64_t inner[kMaxModels];
  int num_models;
  int64_t numel;
  T* out;
};

// All coefficients scalar: the memory-bound hot path (uniform averaging, task vectors). K models
// known at compile time (0: run-time count); each thread handles kUnroll elements per step with
// all loads issued before the first use.
template <typename T, int K>
__global__ void __launch_bounds__(kElementwiseThreads)
    combine_scalar_kernel(const CombineArgs<T, float> args) {
  using Acc = typename AccOf<T>::type;
  constexpr int kUnroll = 4;
  const int k = K > 0 ? K : args.num_models;
  Acc s[K > 0 ? K : kMaxModels];
#pragma unroll
  for (int m = 0; m < (K > 0 ? K : kMaxModels); ++m) s[m] = m < k ? static_cast<Acc>(args.scalar[m]) : Acc(0);
  const int64_t n = args.numel;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; base < n; base += step) {
    Acc acc[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + static_cast<int64_t>(u) * blockDim.x;
      acc[u] = e < n ? mul_rn(s[0], load_as<Acc>(args.weight[0], e)) : Acc(0);
    }
#pragma unroll
    for (int m = 1; m < (K > 0 ? K : kMaxModels); ++m) {
      if (K == 0 && m >= k) break;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = base + static_cast<int64_t>(u) * blockDim.x;
        if (e < n) acc[u] = add_rn(acc[u], mul_rn(s[m], load_as<Acc>(args.weight[m], e)));
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + static_cast<int64_t>(u) * blockDim.x;
      if (e < n) args.out[e] = store_as<T>(acc[u]);
    }
  }
}

template <typename C, typename Acc>
__device__ __forceinline__ Acc coefficient_at(const C* coef, double scalar, int64_t inner, int64_t e) {
  if (coef == nullptr) return static_cast<Acc>(scalar);
  return static_cast<Acc>(coef[inner == 1 ? e : e / inner]);
}

// Any mix of scalar, per-channel and per-entry coefficients.
template <typename T, typename C>
__global__ void __launch_bounds__(kElementwiseThreads) combine_coef_kernel(const CombineArgs<T, C> args) {
  using Acc = typename AccOf<T>::type;
  const int64_t n = args.numel;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    Acc acc = mul_rn(coefficient_at<C, Acc>(args.coef[0], args.scalar[0], args.inner[0], e),
                     load_as<Acc>(args.weight[0], e));
    for (int m = 1; m < args.num_models; ++m)
      acc = add_rn(acc, mul_rn(coefficient_at<C, Acc>(args.coef[m], args.scalar[m], args.inner[m], e),
                               load_as<Acc>(args.weight[m], e)));
    args.out[e] = store_as<T>(acc);
  }
}

// out = alpha a + (1 - alpha) b with alpha = sigmoid(logit), one logit per run of `inner`. Per-entry
// logits take the sigmoid in the weights' precision, shared ones in double (as the CPU kernels).
template <typename T, typename L>
__global__ void __launch_bounds__(kElementwiseThreads)
    sigmoid_merge_kernel(const T* a, const T* b, const L* logit, int64_t inner, int64_t n, T* out) {
  using Acc = typename AccOf<T>::type;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    const Acc s = inner == 1 ? sigmoid(static_cast<Acc>(logit[e])) : static_cast<Acc>(sigmoid(static_cast<double>(logit[e / inner])));
    out[e] = store_as<T>(add_rn(mul_rn(s, load_as<Acc>(a, e)), mul_rn(Acc(1) - s, load_as<Acc>(b, e))));
  }
}

// Per-entry coefficient gradients. kDiff = false: grad_c = g w (combine); kDiff = true:
// grad_l = g (a - b) s (1 - s) with s = sigmoid(logit) (NP Merge), all in double.
template <typename T, typename C, bool kDiff>
__global__ void __launch_bounds__(kElementwiseThreads)
    elementwise_grad_kernel(const T* g, const T* a, const T* b, const C* logit, int64_t n, C* grad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    const double ge = load_as<double>(g, e);
    if (kDiff) {
      const double s = static_cast<double>(sigmoid(logit[e]));
      grad[e] = static_cast<C>(ge * (load_as<double>(a, e) - load_as<double>(b, e)) * s * (1.0 - s));
    } else {
      grad[e] = static_cast<C>(ge * load_as<double>(a, e));
    }
  }
}

constexpr int kRunThreads = 256;
constexpr int64_t kRunChunk = 8192;

template <typename T, bool kDiff>
__device__ __forceinline__ double run_term(const T* g, const T* a, const T* b, int64_t e) {
  const double w = kDiff ? load_as<double>(a, e) - load_as<double>(b, e) : load_as<double>(a, e);
  return load_as<double>(g, e) * w;
}

// sums[r] += sum over run r of g (a - b) (kDiff) or g a, for runs of `inner` elements; sums must be
// zeroed by the caller. Each block takes chunks of kRunChunk elements: a chunk that meets few runs
// reduces each of them across the block, one that meets many short runs gives each thread whole
// runs. Partial sums from different chunks meet through double atomics.
template <typename T, bool kDiff>
__global__ void __launch_bounds__(kRunThreads)
    run_sums_kernel(const T* g, const T* a, const T* b, int64_t inner, int64_t n, double* sums) {
  __shared__ double scratch[kRunThreads / 32];
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kRunChunk; c0 < n;
       c0 += static_cast<int64_t>(gridDim.x) * kRunChunk) {
    const int64_t c1 = c0 + kRunChunk < n ? c0 + kRunChunk : n;
    const int64_t first = c0 / inner, last = (c1 - 1) / inner;
    if (last - first < 32) {
      for (int64_t r = first; r <= last; ++r) {  // uniform across the block
        const int64_t lo = r * inner > c0 ? r * inner : c0;
        const int64_t hi = (r + 1) * inner < c1 ? (r + 1) * inner : c1;
        double acc = 0.0;
        for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) acc += run_term<T, kDiff>(g, a, b, e);
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) atomicAdd(sums + r, acc);
      }
    } else {
      for (int64_t r = first + threadIdx.x; r <= last; r += blockDim.x) {
        const int64_t lo = r * inner > c0 ? r * inner : c0;
        const int64_t hi = (r + 1) * inner < c1 ? (r + 1) * inner : c1;
        double acc = 0.0;
        for (int64_t e = lo; e < hi; ++e) acc += run_term<T, kDiff>(g, a, b, e);
        atomicAdd(sums + r, acc);
      }
    }
  }
}

}  // namespace cuda_kernels
}  // namespace fastmerge
