// Small device helpers shared by the CUDA kernels. Header-only, no torch headers, so nvcc can
// compile-check every kernel file on a machine without a CUDA build of torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmerge {
namespace cuda_kernels {

// Accumulation type: double for double data, float for everything narrower.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename A, typename T>
__device__ __forceinline__ A load_as(const T* p, int64_t i) {
  return static_cast<A>(p[i]);
}
template <>
__device__ __forceinline__ float load_as<float, __half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ double load_as<double, __half>(const __half* p, int64_t i) {
  return static_cast<double>(__half2float(p[i]));
}
template <>
__device__ __forceinline__ double load_as<double, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return static_cast<double>(__bfloat162float(p[i]));
}

template <typename T, typename A>
__device__ __forceinline__ T store_as(A x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half store_as<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half store_as<__half, double>(double x) {
  return __double2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, double>(double x) {
  return __double2bfloat16(x);
}

// Rounded products and sums that the compiler may not contract into an FMA: the CPU kernels
// round every product (x86-64 without -mfma has no FMA), so the CUDA results match them bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// Sum of `value` over the block, valid in thread 0. Every thread of the block must call it;
// `scratch` holds one double per warp.
__device__ __forceinline__ double block_sum(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = (blockDim.x + 31) >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? scratch[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // scratch may be reused by the next call
  return value;
}

}  // namespace cuda_kernels
}  // namespace fastmerge
