// CUDA kernels of fastmerge::combine / combine_out / combine_backward and sigmoid_merge /
// sigmoid_merge_backward: the same schemas and checks as the CPU kernels (csrc/cpu/), one launch
// per tensor on the current stream, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "combine_checks.h"
#include "cuda/device_types.h"
#include "kernels/cuda/combine.cuh"

namespace fastmerge {
namespace {

namespace ck = cuda_kernels;

void check_cuda(const at::Tensor& t, const char* op, const char* what, int64_t index, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", what, "[", index, "] is on ", t.device(), " but the first tensor is on ",
              like.device(), "; move every input to one device");
}

template <typename T, typename C>
void launch_combine(const ck::CombineArgs<T, C>& args, bool all_scalar, cudaStream_t stream) {
  if (args.numel == 0) return;
  if (all_scalar) {
    ck::CombineArgs<T, float> scalar_args;
    for (int m = 0; m < args.num_models; ++m) {
      scalar_args.weight[m] = args.weight[m];
      scalar_args.coef[m] = nullptr;
      scalar_args.scalar[m] = args.scalar[m];
      scalar_args.inner[m] = args.numel;
    }
    scalar_args.num_models = args.num_models;
    scalar_args.numel = args.numel;
    scalar_args.out = args.out;
    const unsigned grid = grid_for(args.numel, ck::kElementwiseThreads * 4);
    switch (args.num_models) {
      case 1: ck::combine_scalar_kernel<T, 1><<<grid, ck::kElementwiseThreads, 0, stream>>>(scalar_args); break;
      case 2: ck::combine_scalar_kernel<T, 2><<<grid, ck::kElementwiseThreads, 0, stream>>>(scalar_args); break;
      case 3: ck::combine_scalar_kernel<T, 3><<<grid, ck::kElementwiseThreads, 0, stream>>>(scalar_args); break;
      case 4: ck::combine_scalar_kernel<T, 4><<<grid, ck::kElementwiseThreads, 0, stream>>>(scalar_args); break;
      default: ck::combine_scalar_kernel<T, 0><<<grid, ck::kElementwiseThreads, 0, stream>>>(scalar_args); break;
    }
  } else {
    ck::combine_coef_kernel<T, C><<<grid_for(args.numel, ck::kElementwiseThreads), ck::kElementwiseThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void combine_into_cuda(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                       int64_t num_models, const std::vector<at::Tensor>& outputs) {
  const Layout layout = check_layout(tensors, coefficients, num_models, "combine");
  TORCH_CHECK(!coefficients.empty() || static_cast<int64_t>(weights.size()) == num_models,
              "combine: without coefficient tensors, weights must hold one scalar per model (", num_models, "), got ",
              weights.size());
  TORCH_CHECK(num_models <= ck::kMaxModels, "combine: the CUDA kernel takes at most ", ck::kMaxModels,
              " models per call, got ", num_models, "; combine in groups (the result is linear in the models)");
  if (layout.num_tensors == 0) return;
  const at::Tensor& device_ref = tensors[0];
  const c10::cuda::CUDAGuard guard(device_ref.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    const at::Tensor& first = tensors[t * num_models];
    const at::Tensor& out = outputs[t];
    TORCH_CHECK(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() && out.is_contiguous(),
                "combine: out[", t, "] must be a contiguous ", first.scalar_type(), " tensor of shape ", first.sizes(),
                ", got ", out.scalar_type(), " of shape ", out.sizes());
    check_cuda(out, "combine", "out", t, device_ref);
    bool use_double_coef = false;
    for (int64_t j = 0; j < num_models && !coefficients.empty(); ++j)
      use_double_coef = use_double_coef || coefficients[t * num_models + j].scalar_type() == at::kDouble;
    std::vector<at::Tensor> keep_alive;
    std::vector<int64_t> inner(num_models, first.numel());
    bool all_scalar = coefficients.empty();
    for (int64_t j = 0; j < num_models; ++j) {
      const int64_t index = t * num_models + j;
      check_cuda(tensors[index], "combine", "tensors", index, device_ref);
      keep_alive.push_back(tensors[index].contiguous());
      if (!coefficients.empty()) {
        check_cuda(coefficients[index], "combine", "coefficients", index, device_ref);
        inner[j] = coefficient_inner(coefficients[index], first, index);
        keep_alive.push_back(coefficients[index].to(use_double_coef ? at::kDouble : at::kFloat).contiguous());
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "combine_cuda", [&] {
      using T = device_t<scalar_t>;
      auto fill = [&](auto* typed_coef_tag) {
        using C = std::remove_pointer_t<decltype(typed_coef_tag)>;
        ck::CombineArgs<T, C> args{};
        for (int64_t j = 0; j < num_models; ++j) {
          const size_t w = coefficients.empty() ? j : 2 * j;
          args.weight[j] = device_ptr(keep_alive[w].const_data_ptr<scalar_t>());
          args.coef[j] = coefficients.empty() ? nullptr : keep_alive[w + 1].const_data_ptr<C>();
          args.scalar[j] = coefficients.empty() ? weights[j] : 0.0;
          args.inner[j] = inner[j];
        }
        args.num_models = static_cast<int>(num_models);
        args.numel = first.numel();
        args.out = device_ptr(out.data_ptr<scalar_t>());
        launch_combine(args, all_scalar, stream);
      };
      if (use_double_coef)
        fill(static_cast<double*>(nullptr));
      else
        fill(static_cast<float*>(nullptr));
    });
  }
}

std::vector<at::Tensor> combine_cuda(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                                    int64_t num_models) {
  return combine_allocating(tensors, coefficients, weights, num_models, combine_into_cuda);
}

void combine_out_cuda(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                     int64_t num_models, at::TensorList out) {
  combine_into_out(tensors, coefficients, weights, num_models, out, combine_into_cuda);
}

// Gradient of one coefficient (kDiff = false: sum of g w over each run) or of one logit
// (kDiff = true: sum of g (a - b) over each run, times s (1 - s)).
template <bool kDiff>
at::Tensor run_gradient(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef,
                        int64_t inner) {
  if (a.numel() == 0) return at::zeros_like(coef, at::MemoryFormat::Contiguous);
  const at::Tensor wa = a.contiguous();
  const at::Tensor wb = kDiff ? b.contiguous() : wa;
  const at::Tensor g = grad.to(wa.scalar_type()).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = wa.numel();
  if (inner == 1) {
    at::Tensor out = at::empty(coef.sizes(), coef.options().memory_format(at::MemoryFormat::Contiguous));
    const at::Tensor c = coef.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wa.scalar_type(), "coef_grad_cuda", [&] {
      using W = scalar_t;
      const auto* pg = device_ptr(g.const_data_ptr<W>());
      const auto* pa = device_ptr(wa.const_data_ptr<W>());
      const auto* pb = device_ptr(wb.const_data_ptr<W>());
      const unsigned grid = grid_for(n, ck::kElementwiseThreads);
      if (out.scalar_type() == at::kFloat)
        ck::elementwise_grad_kernel<device_t<W>, float, kDiff><<<grid, ck::kElementwiseThreads, 0, stream>>>(
            pg, pa, pb, c.const_data_ptr<float>(), n, out.data_ptr<float>());
      else
        ck::elementwise_grad_kernel<device_t<W>, double, kDiff><<<grid, ck::kElementwiseThreads, 0, stream>>>(
            pg, pa, pb, c.const_data_ptr<double>(), n, out.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  at::Tensor sums = at::zeros({coef.numel()}, wa.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wa.scalar_type(), "run_sums_cuda", [&] {
    using W = scalar_t;
    ck::run_sums_kernel<device_t<W>, kDiff><<<grid_for(n, ck::kRunChunk), ck::kRunThreads, 0, stream>>>(
        device_ptr(g.const_data_ptr<W>()), device_ptr(wa.const_data_ptr<W>()), device_ptr(wb.const_data_ptr<W>()),
        inner, n, sums.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (kDiff) {
    const at::Tensor s = at::sigmoid(coef.to(at::kDouble).reshape({-1}));
    sums = sums * s * (1.0 - s);
  }
  return sums.to(coef.scalar_type()).view(coef.sizes());
}

std::vector<at::Tensor> combine_backward_cuda(at::TensorList grad_outputs, at::TensorList tensors,
                                              at::TensorList coefficients, int64_t num_models) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!tensors.empty()) guard.emplace(tensors[0].device());
  return combine_backward_each(grad_outputs, tensors, coefficients, num_models,
                               [](const at::Tensor& grad, const at::Tensor& w, const at::Tensor& c, int64_t index) {
                                 return run_gradient<false>(grad, w, w, c, coefficient_inner(c, w, index));
                               });
}

std::vector<at::Tensor> sigmoid_merge_cuda(at::TensorList a, at::TensorList b, at::TensorList logits) {
  TORCH_CHECK(a.size() == b.size() && a.size() == logits.size(), "sigmoid_merge: got ", a.size(), ", ", b.size(),
              " and ", logits.size(), " tensors");
  std::vector<at::Tensor> outputs;
  if (a.empty()) return outputs;
  const c10::cuda::CUDAGuard guard(a[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t t = 0; t < a.size(); ++t) {
    const int64_t inner = logit_inner(a[t], b[t], logits[t], t);
    check_cuda(b[t], "sigmoid_merge", "b", t, a[0]);
    check_cuda(logits[t], "sigmoid_merge", "logits", t, a[0]);
    const at::Tensor wa = a[t].contiguous(), wb = b[t].contiguous(), l = logits[t].contiguous();
    at::Tensor out = at::empty(wa.sizes(), wa.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t n = wa.numel();
    if (n > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wa.scalar_type(), "sigmoid_merge_cuda", [&] {
        using W = scalar_t;
        const unsigned grid = grid_for(n, ck::kElementwiseThreads);
        if (l.scalar_type() == at::kFloat)
          ck::sigmoid_merge_kernel<device_t<W>, float><<<grid, ck::kElementwiseThreads, 0, stream>>>(
              device_ptr(wa.const_data_ptr<W>()), device_ptr(wb.const_data_ptr<W>()), l.const_data_ptr<float>(), inner,
              n, device_ptr(out.data_ptr<W>()));
        else
          ck::sigmoid_merge_kernel<device_t<W>, double><<<grid, ck::kElementwiseThreads, 0, stream>>>(
              device_ptr(wa.const_data_ptr<W>()), device_ptr(wb.const_data_ptr<W>()), l.const_data_ptr<double>(),
              inner, n, device_ptr(out.data_ptr<W>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    outputs.push_back(out.view(a[t].sizes()));
  }
  return outputs;
}

std::vector<at::Tensor> sigmoid_merge_backward_cuda(at::TensorList grad, at::TensorList a, at::TensorList b,
                                                    at::TensorList logits) {
  TORCH_CHECK(grad.size() == a.size() && a.size() == b.size() && a.size() == logits.size(),
              "sigmoid_merge_backward: list lengths differ");
  std::vector<at::Tensor> grads;
  if (a.empty()) return grads;
  const c10::cuda::CUDAGuard guard(a[0].device());
  for (size_t t = 0; t < a.size(); ++t) {
    const int64_t inner = logit_inner(a[t], b[t], logits[t], t);
    grads.push_back(run_gradient<true>(grad[t], a[t], b[t], logits[t], inner).view(logits[t].sizes()));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CUDA, m) {
  m.impl("combine", &combine_cuda);
  m.impl("combine_out", &combine_out_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
  m.impl("sigmoid_merge", &sigmoid_merge_cuda);
  m.impl("sigmoid_merge_backward", &sigmoid_merge_backward_cuda);
}

}  // namespace fastmerge
