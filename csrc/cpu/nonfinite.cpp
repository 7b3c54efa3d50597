// CPU kernel of fastmerge::count_nonfinite: NaN/Inf entries of many tensors in one call, by bit
// pattern (kernels/nonfinite.h), parallel over chunks of each tensor.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <functional>

#include "kernels/nonfinite.h"

namespace fastmerge {
namespace {

constexpr int64_t kGrain = 1 << 16;

template <typename Bits>
int64_t count_tensor(const at::Tensor& t, Bits mask) {
  const Bits* bits = static_cast<const Bits*>(t.const_data_ptr());
  return at::parallel_reduce(
      0, t.numel(), kGrain, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t partial) {
        return partial + kernels::count_nonfinite_bits<Bits>(bits, begin, end, mask);
      },
      std::plus<int64_t>());
}

at::Tensor count_nonfinite_cpu(at::TensorList tensors) {
  at::Tensor counts = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor t = tensors[i].contiguous();
    switch (t.scalar_type()) {
      case at::kDouble: out[i] = count_tensor<uint64_t>(t, kernels::kExponentF64); break;
      case at::kFloat: out[i] = count_tensor<uint32_t>(t, kernels::kExponentF32); break;
      case at::kHalf: out[i] = count_tensor<uint16_t>(t, kernels::kExponentF16); break;
      case at::kBFloat16: out[i] = count_tensor<uint16_t>(t, kernels::kExponentBF16); break;
      default:
        TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
                    "count_nonfinite: tensor ", i, " has unsupported dtype ", t.scalar_type());
        out[i] = 0;  // integers and booleans are always finite
    }
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) { m.impl("count_nonfinite", &count_nonfinite_cpu); }

}  // namespace fastmerge
