// CPU kernels of fastmerge::combine (out_t = sum_j c_tj * W_tj over many tensors in one call) and
// fastmerge::combine_backward (the gradient with respect to the coefficients, for NP Merge).
//
// Layout of the flat lists: tensors[t * num_models + j] is model j's copy of tensor t; the same for
// coefficients when they are given, else weights[j] is model j's scalar for every tensor.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "combine_checks.h"
#include "kernels/combine.h"

namespace fastmerge {
namespace {

// Elements per parallel work item: big enough to amortise scheduling, small enough that the last
// tensors of a list still spread over all threads.
constexpr int64_t kChunk = 1 << 15;

// Type-erased view of one tensor's operands, resolved to typed pointers inside the dtype dispatch.
struct TensorJob {
  std::vector<const void*> weights;
  std::vector<const void*> coefs;  // nullptr entries: scalar weight
  std::vector<int64_t> inner;
  std::vector<double> scalars;
  at::ScalarType dtype;
  at::ScalarType coef_dtype;
  int64_t numel;
  void* out;
};

template <typename T, typename Coef>
void run_combine_chunk(const TensorJob& job, int64_t begin, int64_t end) {
  using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const int k = static_cast<int>(job.weights.size());
  std::vector<kernels::CombineOperand<T, Coef>> ops(k);
  for (int j = 0; j < k; ++j)
    ops[j] = {static_cast<const T*>(job.weights[j]), static_cast<const Coef*>(job.coefs[j]), job.inner[j],
              job.scalars[j]};
  kernels::combine_range<T, Coef, Acc>(ops.data(), k, begin, end, static_cast<T*>(job.out));
}

// Writes out[t] = sum_j c_tj * W_tj into the given (contiguous, correctly shaped) outputs.
void combine_into(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                  int64_t num_models, const std::vector<at::Tensor>& outputs) {
  const Layout layout = check_layout(tensors, coefficients, num_models, "combine");
  TORCH_CHECK(!coefficients.empty() || static_cast<int64_t>(weights.size()) == num_models,
              "combine: without coefficient tensors, weights must hold one scalar per model (", num_models,
              "), got ", weights.size());
  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided inputs
  std::vector<TensorJob> jobs(layout.num_tensors);
  std::vector<int64_t> chunk_start{0};  // prefix sums of chunks per tensor
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    TensorJob& job = jobs[t];
    const at::Tensor& first = tensors[t * num_models];
    const at::Tensor& out = outputs[t];
    TORCH_CHECK(out.sizes() == first.sizes() && out.scalar_type() == first.scalar_type() && out.is_contiguous(),
                "combine: out[", t, "] must be a contiguous ", first.scalar_type(), " tensor of shape ", first.sizes(),
                ", got ", out.scalar_type(), " of shape ", out.sizes());
    job.dtype = first.scalar_type();
    job.numel = first.numel();
    // One coefficient dtype per tensor keeps the dispatch to two cases: the widest one given.
    job.coef_dtype = at::kFloat;
    for (int64_t j = 0; j < num_models && !coefficients.empty(); ++j)
      if (coefficients[t * num_models + j].scalar_type() == at::kDouble) job.coef_dtype = at::kDouble;
    for (int64_t j = 0; j < num_models; ++j) {
      const int64_t index = t * num_models + j;
      at::Tensor w = tensors[index].contiguous();
      keep_alive.push_back(w);
      job.weights.push_back(w.const_data_ptr());
      if (coefficients.empty()) {
        job.coefs.push_back(nullptr);
        job.inner.push_back(job.numel);
        job.scalars.push_back(weights[j]);
      } else {
        const int64_t inner = coefficient_inner(coefficients[index], first, index);
        at::Tensor c = coefficients[index].to(job.coef_dtype).contiguous();
        keep_alive.push_back(c);
        job.coefs.push_back(c.const_data_ptr());
        job.inner.push_back(inner);
        job.scalars.push_back(0.0);
      }
    }
    job.out = out.data_ptr();
    chunk_start.push_back(chunk_start.back() + (job.numel + kChunk - 1) / kChunk);
  }

  at::parallel_for(0, chunk_start.back(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t = std::upper_bound(chunk_start.begin(), chunk_start.end(), c) - chunk_start.begin() - 1;
      const TensorJob& job = jobs[t];
      const int64_t lo = (c - chunk_start[t]) * kChunk;
      const int64_t hi = std::min(job.numel, lo + kChunk);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dtype, "combine", [&] {
        if (job.coef_dtype == at::kFloat)
          run_combine_chunk<scalar_t, float>(job, lo, hi);
        else
          run_combine_chunk<scalar_t, double>(job, lo, hi);
      });
    }
  });
}

std::vector<at::Tensor> combine_cpu(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                                    int64_t num_models) {
  return combine_allocating(tensors, coefficients, weights, num_models, combine_into);
}

void combine_out_cpu(at::TensorList tensors, at::TensorList coefficients, at::ArrayRef<double> weights,
                     int64_t num_models, at::TensorList out) {
  combine_into_out(tensors, coefficients, weights, num_models, out, combine_into);
}

// grad_coef[r] = sum of grad * w over run r (runs of `inner` elements), split across threads.
template <typename T, typename Coef>
void coefficient_grad_runs(const T* gp, const T* wp, int64_t inner, int64_t runs, Coef* cp) {
  if (inner == 1) {
    at::parallel_for(0, runs, kChunk, [&](int64_t begin, int64_t end) {
      kernels::coef_grad_elementwise(gp, wp, begin, end, cp);
    });
  } else if (runs >= 4 * at::get_num_threads()) {
    at::parallel_for(0, runs, std::max<int64_t>(1, kChunk / inner), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) cp[r] = static_cast<Coef>(kernels::dot_range(gp, wp, r * inner, (r + 1) * inner));
    });
  } else {
    // Few long runs (per-tensor coefficients): split each run across threads instead.
    for (int64_t r = 0; r < runs; ++r) {
      const double total = at::parallel_reduce(
          r * inner, (r + 1) * inner, kChunk, 0.0,
          [&](int64_t begin, int64_t end, double acc) { return acc + kernels::dot_range(gp, wp, begin, end); },
          [](double a, double b) { return a + b; });
      cp[r] = static_cast<Coef>(total);
    }
  }
}

// d/dc of sum(grad * sum_j c_j W_j) = sum over each coefficient's run of grad * W_j.
at::Tensor coefficient_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& coef, int64_t index) {
  const int64_t inner = coefficient_inner(coef, weight, index);
  if (weight.numel() == 0) return at::zeros_like(coef, at::MemoryFormat::Contiguous);
  const at::Tensor w = weight.contiguous();
  // Autograd hands gradients in the output's dtype, which is the weight's; one dtype keeps the
  // instantiations (and the compile time) down.
  const at::Tensor g = grad.to(w.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(coef, at::MemoryFormat::Contiguous);
  const int64_t runs = coef.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "combine_backward", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    if (coef.scalar_type() == at::kFloat)
      coefficient_grad_runs(gp, wp, inner, runs, out.data_ptr<float>());
    else
      coefficient_grad_runs(gp, wp, inner, runs, out.data_ptr<double>());
  });
  return out;
}

std::vector<at::Tensor> combine_backward_cpu(at::TensorList grad_outputs, at::TensorList tensors,
                                             at::TensorList coefficients, int64_t num_models) {
  return combine_backward_each(grad_outputs, tensors, coefficients, num_models, coefficient_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) {
  m.impl("combine", &combine_cpu);
  m.impl("combine_out", &combine_out_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace fastmerge
