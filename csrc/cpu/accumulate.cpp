// CPU kernel of fastmerge::accumulate_float64_: parts added into a float64 total in order, one pass
// (kernels/accumulate.h), parallel over blocks of elements.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "kernels/accumulate.h"

namespace fastmerge {
namespace {

template <typename P>
void accumulate(at::Tensor& total, const std::vector<at::Tensor>& parts, bool fresh) {
  std::vector<const P*> pointers;
  for (const at::Tensor& p : parts) pointers.push_back(p.const_data_ptr<P>());
  double* out = total.data_ptr<double>();
  const int64_t count = static_cast<int64_t>(pointers.size());
  at::parallel_for(0, total.numel(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
    kernels::accumulate_parts<P>(out, pointers.data(), count, begin, end, fresh);
  });
}

void accumulate_float64_cpu(at::Tensor& total, at::TensorList parts, bool fresh) {
  TORCH_CHECK(total.scalar_type() == at::kDouble && total.is_contiguous() && total.device().is_cpu(),
              "accumulate_float64_: the total must be a contiguous float64 CPU tensor, got ", total.scalar_type(),
              " on ", total.device());
  std::vector<at::Tensor> contiguous;
  for (size_t k = 0; k < parts.size(); ++k) {
    const at::Tensor& p = parts[k];
    TORCH_CHECK(p.device().is_cpu() && p.sizes() == total.sizes(), "accumulate_float64_: part ", k, " has shape ",
                p.sizes(), " on ", p.device(), ", the total ", total.sizes(), " on the CPU");
    TORCH_CHECK(p.scalar_type() == parts[0].scalar_type() &&
                    (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
                "accumulate_float64_: parts must all be float32 or all float64, part ", k, " is ", p.scalar_type());
    contiguous.push_back(p.contiguous());
  }
  if (contiguous.empty()) {
    if (fresh) total.zero_();
    return;
  }
  if (contiguous[0].scalar_type() == at::kFloat) {
    accumulate<float>(total, contiguous, fresh);
  } else {
    accumulate<double>(total, contiguous, fresh);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) { m.impl("accumulate_float64_", &accumulate_float64_cpu); }

}  // namespace fastmerge
