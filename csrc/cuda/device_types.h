// Maps torch's scalar types to the CUDA types the header-only kernels use, and picks launch sizes.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace fastmerge {

template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
using device_t = typename DeviceType<T>::type;

template <typename T>
const device_t<T>* device_ptr(const T* p) {
  return reinterpret_cast<const device_t<T>*>(p);
}
template <typename T>
device_t<T>* device_ptr(T* p) {
  return reinterpret_cast<device_t<T>*>(p);
}

// Blocks for a grid-stride loop over n items of `per_block` each: enough to fill the device a few
// times over, no more (the loop covers the rest).
inline unsigned grid_for(int64_t n, int64_t per_block) {
  static const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * 16)));
}

}  // namespace fastmerge
