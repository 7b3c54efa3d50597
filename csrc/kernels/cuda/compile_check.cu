// Instantiates every header-only CUDA kernel for the types the extension uses, so that
// `nvcc -c` on this file alone (no torch) checks the kernels compile: CI runs it wherever nvcc
// exists (tests/engine/test_cuda_headers.py). Never linked into the extension.
#include "kernels/cuda/combine.cuh"
#include "kernels/cuda/covariance.cuh"
#include "kernels/cuda/lap.cuh"

namespace ck = fastmerge::cuda_kernels;

template <typename T>
void instantiate_elementwise() {
  ck::CombineArgs<T, float> args{};
  ck::CombineArgs<T, double> args_double{};
  ck::combine_scalar_kernel<T, 1><<<1, 1>>>(args);
  ck::combine_scalar_kernel<T, 2><<<1, 1>>>(args);
  ck::combine_scalar_kernel<T, 3><<<1, 1>>>(args);
  ck::combine_scalar_kernel<T, 4><<<1, 1>>>(args);
  ck::combine_scalar_kernel<T, 0><<<1, 1>>>(args);
  ck::combine_coef_kernel<T, float><<<1, 1>>>(args);
  ck::combine_coef_kernel<T, double><<<1, 1>>>(args_double);
  ck::sigmoid_merge_kernel<T, float><<<1, 1>>>(nullptr, nullptr, static_cast<const float*>(nullptr), 1, 0, nullptr);
  ck::sigmoid_merge_kernel<T, double><<<1, 1>>>(nullptr, nullptr, static_cast<const double*>(nullptr), 1, 0, nullptr);
  ck::elementwise_grad_kernel<T, float, false><<<1, 1>>>(nullptr, nullptr, nullptr, nullptr, 0, nullptr);
  ck::elementwise_grad_kernel<T, double, true><<<1, 1>>>(nullptr, nullptr, nullptr, nullptr, 0, nullptr);
  ck::run_sums_kernel<T, false><<<1, 1>>>(nullptr, nullptr, nullptr, 1, 0, nullptr);
  ck::run_sums_kernel<T, true><<<1, 1>>>(nullptr, nullptr, nullptr, 1, 0, nullptr);
  ck::shift_kernel<T><<<1, 1>>>(nullptr, 0, nullptr, nullptr, nullptr);
  ck::shift_rows_kernel<T, float><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, nullptr, nullptr);
  ck::shift_rows_kernel<T, double><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, nullptr, nullptr);
  ck::shift_rows_kernel<T, T><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, nullptr, nullptr);
  ck::shift_rows_vec_kernel<T, T, 16 / sizeof(T)><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, nullptr, nullptr);
  ck::shift_rows_vec_kernel<T, float, 16 / sizeof(T)><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, nullptr, nullptr);
  ck::shift_rows_vec_kernel<T, double, 16 / sizeof(T)><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, nullptr, nullptr);
}

void instantiate_all() {
  instantiate_elementwise<float>();
  instantiate_elementwise<double>();
  instantiate_elementwise<__half>();
  instantiate_elementwise<__nv_bfloat16>();
  ck::fold_tile_kernel<float><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, 0, 0, 0, false, nullptr, nullptr, nullptr, nullptr,
                                        nullptr, 0.0);
  ck::fold_tile_kernel<double><<<1, 1>>>(nullptr, 0, 0, 0, nullptr, 0, 0, 0, false, nullptr, nullptr, nullptr, nullptr,
                                         nullptr, 0.0);
  ck::mirror_upper_kernel<<<1, 1>>>(nullptr, 0);
  ck::lap_solve_kernel<<<1, 1>>>(nullptr, 0, 0, false, nullptr, nullptr);
}

#include "kernels/cuda/gather.cuh"

void instantiate_gather() { ck::gather_rows_kernel<<<1, 1>>>(nullptr, 0, 0, nullptr); }
