// Argument checks shared by the CPU and CUDA kernels of combine / combine_backward /
// sigmoid_merge: list layout, and how a coefficient (or logit) broadcasts over its weight.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace fastmerge {

struct Layout {
  int64_t num_tensors;
  int64_t num_models;
};

// Whether `coef` broadcasts over `weight` along trailing axes only (shape W.shape[:r] + (1,) *
// (ndim - r), or one element), and if so how many consecutive elements share one value.
inline bool trailing_broadcast(const at::Tensor& coef, const at::Tensor& weight, int64_t* inner) {
  if (coef.numel() == 1) {
    *inner = std::max<int64_t>(weight.numel(), 1);
    return true;
  }
  bool ok = coef.dim() == weight.dim();
  bool in_prefix = true;
  for (int64_t d = 0; ok && d < coef.dim(); ++d) {
    if (in_prefix && coef.size(d) == weight.size(d)) continue;
    in_prefix = false;
    ok = coef.size(d) == 1;
  }
  *inner = coef.numel() == 0 ? 1 : weight.numel() / coef.numel();
  return ok;
}

// Elements of a weight that share one coefficient value, after checking the coefficient.
inline int64_t coefficient_inner(const at::Tensor& coef, const at::Tensor& weight, int64_t index) {
  TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
              "combine: coefficients[", index, "] must be float32 or float64, got ", coef.scalar_type());
  int64_t inner = 1;
  TORCH_CHECK(trailing_broadcast(coef, weight, &inner), "combine: coefficients[", index, "] of shape ", coef.sizes(),
              " does not fit weight of shape ", weight.sizes(),
              "; use one value, the full shape, or the leading axes with trailing 1s (per channel)");
  return inner;
}

inline Layout check_layout(at::TensorList tensors, at::TensorList coefficients, int64_t num_models, const char* op) {
  TORCH_CHECK(num_models >= 1, op, ": num_models must be >= 1, got ", num_models);
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(n % num_models == 0, op, ": got ", n, " tensors, not a multiple of num_models=", num_models);
  TORCH_CHECK(coefficients.empty() || static_cast<int64_t>(coefficients.size()) == n, op,
              ": coefficients must be empty or one per tensor (", n, "), got ", coefficients.size());
  const Layout layout{n / num_models, num_models};
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    const at::Tensor& first = tensors[t * num_models];
    TORCH_CHECK(at::isFloatingType(first.scalar_type()), op, ": tensors[", t * num_models,
                "] must be floating point, got ", first.scalar_type());
    for (int64_t j = 1; j < num_models; ++j) {
      const at::Tensor& w = tensors[t * num_models + j];
      TORCH_CHECK(w.sizes() == first.sizes() && w.scalar_type() == first.scalar_type(), op, ": tensor ", t,
                  " of model ", j, " has shape ", w.sizes(), " and dtype ", w.scalar_type(), " but model 0 has ",
                  first.sizes(), " and ", first.scalar_type(), "; every model must provide the same tensor");
    }
  }
  return layout;
}

// Elements sharing one logit (logits broadcast along trailing axes, as the combine op's
// coefficients), after checking shapes and dtypes.
inline int64_t logit_inner(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit, size_t t) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "sigmoid_merge: tensor ", t,
              " has shapes/dtypes ", a.sizes(), " ", a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "sigmoid_merge: tensor ", t, " must be floating point");
  TORCH_CHECK(logit.scalar_type() == at::kFloat || logit.scalar_type() == at::kDouble, "sigmoid_merge: logits[", t,
              "] must be float32 or float64");
  int64_t inner = 1;
  TORCH_CHECK(trailing_broadcast(logit, a, &inner), "sigmoid_merge: logits[", t, "] of shape ", logit.sizes(),
              " does not fit tensor of shape ", a.sizes());
  return inner;
}

// The allocating and the out= forms of combine around one backend's "into" function.
template <typename Into>
std::vector<at::Tensor> combine_allocating(at::TensorList tensors, at::TensorList coefficients,
                                           at::ArrayRef<double> weights, int64_t num_models, Into into) {
  std::vector<at::Tensor> outputs;
  for (size_t t = 0; num_models > 0 && t < tensors.size(); t += num_models)
    outputs.push_back(at::empty(tensors[t].sizes(), tensors[t].options().memory_format(at::MemoryFormat::Contiguous)));
  into(tensors, coefficients, weights, num_models, outputs);
  return outputs;
}

template <typename Into>
void combine_into_out(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                      int64_t num_models, at::TensorList out, Into into) {
  TORCH_CHECK(num_models >= 1 && out.size() * num_models == tensors.size(), "combine_out: expected ",
              num_models >= 1 ? tensors.size() / num_models : 0, " outputs, got ", out.size());
  into(tensors, coefficients, weights, num_models, std::vector<at::Tensor>(out.begin(), out.end()));
}

// combine_backward's checks and loop around one backend's gradient of a single coefficient,
// grad_of(grad_output, weight, coefficient, index).
template <typename GradOf>
std::vector<at::Tensor> combine_backward_each(at::TensorList grad_outputs, at::TensorList tensors,
                                              at::TensorList coefficients, int64_t num_models, GradOf grad_of) {
  const Layout layout = check_layout(tensors, coefficients, num_models, "combine_backward");
  TORCH_CHECK(static_cast<int64_t>(grad_outputs.size()) == layout.num_tensors, "combine_backward: expected ",
              layout.num_tensors, " gradients, got ", grad_outputs.size());
  TORCH_CHECK(!coefficients.empty(), "combine_backward: needs the coefficient tensors");
  std::vector<at::Tensor> grads;
  grads.reserve(tensors.size());
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    TORCH_CHECK(grad_outputs[t].sizes() == tensors[t * num_models].sizes(), "combine_backward: grad_outputs[", t,
                "] has shape ", grad_outputs[t].sizes(), ", expected ", tensors[t * num_models].sizes());
    for (int64_t j = 0; j < num_models; ++j) {
      const int64_t index = t * num_models + j;
      grads.push_back(grad_of(grad_outputs[t], tensors[index], coefficients[index], index));
    }
  }
  return grads;
}

}  // namespace fastmerge
