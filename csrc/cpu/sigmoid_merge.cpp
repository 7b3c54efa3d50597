// CPU kernels of fastmerge::sigmoid_merge (two-parent NP Merge: out = sigmoid(l) w_a + (1 - sigmoid(l)) w_b
// for many tensors) and its backward with respect to the logits a.
//
// Memory is the point: the forward writes sigmoid(a) into its output buffer and merges in place, and
// the backward recomputes sigmoid(a) into the gradient buffer, so neither keeps an intermediate of
// the weights' size (the per-tensor autograd expression keeps several).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "combine_checks.h"
#include "kernels/combine.h"

namespace fastmerge {
namespace {

constexpr int64_t kGrain = 1 << 15;

bool elementwise_in_place(const at::Tensor& w, const at::Tensor& logit, int64_t inner) {
  return inner == 1 && logit.numel() == w.numel() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble);
}

std::vector<at::Tensor> sigmoid_merge_cpu(at::TensorList a, at::TensorList b, at::TensorList logits) {
  TORCH_CHECK(a.size() == b.size() && a.size() == logits.size(), "sigmoid_merge: got ", a.size(), ", ", b.size(),
              " and ", logits.size(), " tensors");
  std::vector<at::Tensor> outputs;
  for (size_t t = 0; t < a.size(); ++t) {
    const int64_t inner = logit_inner(a[t], b[t], logits[t], t);
    const at::Tensor wa = a[t].contiguous(), wb = b[t].contiguous();
    const int64_t n = wa.numel();
    at::Tensor out;
    if (elementwise_in_place(wa, logits[t], inner)) {
      out = at::sigmoid(logits[t].to(wa.scalar_type())).contiguous();  // alpha, merged in place below
      AT_DISPATCH_FLOATING_TYPES(wa.scalar_type(), "sigmoid_merge", [&] {
        const scalar_t* pa = wa.const_data_ptr<scalar_t>();
        const scalar_t* pb = wb.const_data_ptr<scalar_t>();
        scalar_t* po = out.data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          kernels::sigmoid_merge_inplace<scalar_t, scalar_t>(pa, pb, po, begin, end);
        });
      });
    } else {
      const at::Tensor alpha = at::sigmoid(logits[t].to(at::kDouble)).contiguous();
      out = at::empty(wa.sizes(), wa.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wa.scalar_type(), "sigmoid_merge_runs", [&] {
        using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
        const scalar_t* pa = wa.const_data_ptr<scalar_t>();
        const scalar_t* pb = wb.const_data_ptr<scalar_t>();
        const double* ps = alpha.const_data_ptr<double>();
        scalar_t* po = out.data_ptr<scalar_t>();
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          kernels::sigmoid_merge_runs<scalar_t, double, acc_t>(pa, pb, ps, inner, begin, end, po);
        });
      });
    }
    outputs.push_back(out.view(a[t].sizes()));
  }
  return outputs;
}

std::vector<at::Tensor> sigmoid_merge_backward_cpu(at::TensorList grad, at::TensorList a, at::TensorList b,
                                                   at::TensorList logits) {
  TORCH_CHECK(grad.size() == a.size() && a.size() == b.size() && a.size() == logits.size(),
              "sigmoid_merge_backward: list lengths differ");
  std::vector<at::Tensor> grads;
  for (size_t t = 0; t < a.size(); ++t) {
    const int64_t inner = logit_inner(a[t], b[t], logits[t], t);
    const at::Tensor wa = a[t].contiguous(), wb = b[t].contiguous();
    const at::Tensor g = grad[t].to(wa.scalar_type()).contiguous();
    const int64_t n = wa.numel();
    if (n == 0) {
      grads.push_back(at::zeros_like(logits[t]));
      continue;
    }
    if (inner == 1) {  // one logit per element: alpha recomputed into the gradient buffer
      at::Tensor out = at::sigmoid(logits[t]).contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wa.scalar_type(), "sigmoid_merge_backward", [&] {
        using w_t = scalar_t;
        const w_t* pa = wa.const_data_ptr<w_t>();
        const w_t* pb = wb.const_data_ptr<w_t>();
        const w_t* pg = g.const_data_ptr<w_t>();
        AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sigmoid_merge_backward_logit", [&] {
          scalar_t* po = out.data_ptr<scalar_t>();
          at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
            kernels::sigmoid_merge_grad_inplace(pg, pa, pb, po, begin, end);
          });
        });
      });
      grads.push_back(out.view(logits[t].sizes()));
      continue;
    }
    const at::Tensor alpha = at::sigmoid(logits[t].to(at::kDouble)).contiguous();
    const int64_t runs = logits[t].numel();
    std::vector<double> sums(runs, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wa.scalar_type(), "sigmoid_merge_backward_runs", [&] {
      const scalar_t* pa = wa.const_data_ptr<scalar_t>();
      const scalar_t* pb = wb.const_data_ptr<scalar_t>();
      const scalar_t* pg = g.const_data_ptr<scalar_t>();
      if (runs >= 4 * at::get_num_threads()) {
        at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / inner), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) sums[r] = kernels::diff_dot_range(pg, pa, pb, r * inner, (r + 1) * inner);
        });
      } else {
        for (int64_t r = 0; r < runs; ++r)
          sums[r] = at::parallel_reduce(
              r * inner, (r + 1) * inner, kGrain, 0.0,
              [&](int64_t begin, int64_t end, double acc) { return acc + kernels::diff_dot_range(pg, pa, pb, begin, end); },
              [](double x, double y) { return x + y; });
      }
    });
    const double* ps = alpha.const_data_ptr<double>();
    at::Tensor out = at::empty({runs}, logits[t].options().dtype(at::kDouble));
    double* po = out.data_ptr<double>();
    for (int64_t r = 0; r < runs; ++r) po[r] = sums[r] * ps[r] * (1.0 - ps[r]);
    grads.push_back(out.to(logits[t].scalar_type()).view(logits[t].sizes()));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) {
  m.impl("sigmoid_merge", &sigmoid_merge_cpu);
  m.impl("sigmoid_merge_backward", &sigmoid_merge_backward_cpu);
}

}  // namespace fastmerge
