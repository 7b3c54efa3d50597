// Weighted combination of k same-shaped tensors, out = sum_j c_j * w_j, and its gradient with
// respect to the coefficients. Header-only, no torch headers: shared by the CPU and CUDA builds
// and cheap to compile.
//
// A coefficient c_j is either a scalar or a tensor that broadcasts along the *trailing* axes of the
// weight: shape W.shape[:r] + (1,) * (ndim - r). In flat memory that means one coefficient value
// per run of `inner` consecutive elements (inner = 1: one coefficient per entry; inner = numel:
// one per tensor; inner = prod(W.shape[1:]): one per output channel).
#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge {
namespace kernels {

// Elements per block when coefficients vary along the range.
constexpr int64_t kCombineBlock = 256;

template <typename T, typename Coef>
struct CombineOperand {
  const T* weight;    // numel elements, contiguous
  const Coef* coef;   // nullptr: use `scalar` for every element
  int64_t inner;      // elements sharing one coefficient value (ignored when coef == nullptr)
  double scalar;
};

namespace detail {

// out[e] = sum_m s[m] * w[m][e] for a compile-time number of models: one fused pass, accumulator in
// a register, so the loop streams k inputs and one output at memory speed (a generic loop over a
// block-local accumulator measured 35% slower).
template <int K, typename T, typename Acc>
void weighted_sum_scalars(const T* const* w, const Acc* s, int64_t len, T* __restrict out) {
  const T* __restrict w0 = w[0];
  const T* __restrict w1 = K > 1 ? w[1] : nullptr;
  const T* __restrict w2 = K > 2 ? w[2] : nullptr;
  const T* __restrict w3 = K > 3 ? w[3] : nullptr;
  for (int64_t e = 0; e < len; ++e) {
    Acc acc = s[0] * static_cast<Acc>(w0[e]);
    if constexpr (K > 1) acc += s[1] * static_cast<Acc>(w1[e]);
    if constexpr (K > 2) acc += s[2] * static_cast<Acc>(w2[e]);
    if constexpr (K > 3) acc += s[3] * static_cast<Acc>(w3[e]);
    out[e] = static_cast<T>(acc);
  }
}

// The same with one coefficient per element for every model.
template <int K, typename T, typename Coef, typename Acc>
void weighted_sum_elementwise(const T* const* w, const Coef* const* c, int64_t len, T* __restrict out) {
  const T* __restrict w0 = w[0];
  const T* __restrict w1 = K > 1 ? w[1] : nullptr;
  const T* __restrict w2 = K > 2 ? w[2] : nullptr;
  const T* __restrict w3 = K > 3 ? w[3] : nullptr;
  const Coef* __restrict c0 = c[0];
  const Coef* __restrict c1 = K > 1 ? c[1] : nullptr;
  const Coef* __restrict c2 = K > 2 ? c[2] : nullptr;
  const Coef* __restrict c3 = K > 3 ? c[3] : nullptr;
  for (int64_t e = 0; e < len; ++e) {
    Acc acc = static_cast<Acc>(c0[e]) * static_cast<Acc>(w0[e]);
    if constexpr (K > 1) acc += static_cast<Acc>(c1[e]) * static_cast<Acc>(w1[e]);
    if constexpr (K > 2) acc += static_cast<Acc>(c2[e]) * static_cast<Acc>(w2[e]);
    if constexpr (K > 3) acc += static_cast<Acc>(c3[e]) * static_cast<Acc>(w3[e]);
    out[e] = static_cast<T>(acc);
  }
}

// More than four models: accumulate model by model in a block-local buffer.
template <typename T, typename Coef, typename Acc>
void weighted_sum_many(const T* const* w, const Coef* const* c, const Acc* s, int num_models, int64_t len,
                       T* out) {
  Acc acc[kCombineBlock];
  for (int64_t e = 0; e < len; ++e) acc[e] = Acc(0);
  for (int m = 0; m < num_models; ++m) {
    const T* wm = w[m];
    if (c == nullptr) {
      for (int64_t e = 0; e < len; ++e) acc[e] += s[m] * static_cast<Acc>(wm[e]);
    } else {
      const Coef* cm = c[m];
      for (int64_t e = 0; e < len; ++e) acc[e] += static_cast<Acc>(cm[e]) * static_cast<Acc>(wm[e]);
    }
  }
  for (int64_t e = 0; e < len; ++e) out[e] = static_cast<T>(acc[e]);
}

}  // namespace detail

// Computes out[begin, end) of one tensor. Acc is float for float/half/bfloat16 weights and double
// for double weights. When every coefficient is a scalar the range is one fused pass; otherwise it
// goes in blocks where per-channel coefficients are first expanded to one value per element, so a
// single elementwise loop serves every granularity.
template <typename T, typename Coef, typename Acc>
void combine_range(const CombineOperand<T, Coef>* operands, int num_models, int64_t begin, int64_t end,
                   T* out) {
  constexpr int kMaxFixed = 4;
  std::vector<const T*> w(num_models);
  std::vector<Acc> s(num_models);
  bool all_scalar = true;
  for (int m = 0; m < num_models; ++m) {
    const CombineOperand<T, Coef>& op = operands[m];
    w[m] = op.weight + begin;
    // A coefficient shared by the whole range is a scalar here.
    const bool scalar = op.coef == nullptr || begin / op.inner == (end - 1) / op.inner;
    if (scalar) s[m] = op.coef == nullptr ? static_cast<Acc>(op.scalar) : static_cast<Acc>(op.coef[begin / op.inner]);
    all_scalar = all_scalar && scalar;
  }
  const int64_t len = end - begin;
  if (all_scalar && num_models <= kMaxFixed) {
    switch (num_models) {
      case 1: return detail::weighted_sum_scalars<1, T, Acc>(w.data(), s.data(), len, out + begin);
      case 2: return detail::weighted_sum_scalars<2, T, Acc>(w.data(), s.data(), len, out + begin);
      case 3: return detail::weighted_sum_scalars<3, T, Acc>(w.data(), s.data(), len, out + begin);
      default: return detail::weighted_sum_scalars<4, T, Acc>(w.data(), s.data(), len, out + begin);
    }
  }
  std::vector<Coef> expanded(all_scalar ? 0 : num_models * kCombineBlock);
  std::vector<const Coef*> c(num_models);
  std::vector<const T*> wb(num_models);
  for (int64_t b0 = begin; b0 < end; b0 += kCombineBlock) {
    const int64_t blen = (end - b0 < kCombineBlock) ? end - b0 : kCombineBlock;
    T* ob = out + b0;
    for (int m = 0; m < num_models; ++m) wb[m] = operands[m].weight + b0;
    if (all_scalar) {  // many models, scalar weights
      detail::weighted_sum_many<T, Coef, Acc>(wb.data(), nullptr, s.data(), num_models, blen, ob);
      continue;
    }
    for (int m = 0; m < num_models; ++m) {
      const CombineOperand<T, Coef>& op = operands[m];
      if (op.coef != nullptr && op.inner == 1) {
        c[m] = op.coef + b0;
        continue;
      }
      Coef* buffer = expanded.data() + m * kCombineBlock;
      for (int64_t e = 0; e < blen; ++e)
        buffer[e] = op.coef == nullptr ? static_cast<Coef>(op.scalar) : op.coef[(b0 + e) / op.inner];
      c[m] = buffer;
    }
    switch (num_models) {
      case 1: detail::weighted_sum_elementwise<1, T, Coef, Acc>(wb.data(), c.data(), blen, ob); break;
      case 2: detail::weighted_sum_elementwise<2, T, Coef, Acc>(wb.data(), c.data(), blen, ob); break;
      case 3: detail::weighted_sum_elementwise<3, T, Coef, Acc>(wb.data(), c.data(), blen, ob); break;
      case 4: detail::weighted_sum_elementwise<4, T, Coef, Acc>(wb.data(), c.data(), blen, ob); break;
      default: detail::weighted_sum_many<T, Coef, Acc>(wb.data(), c.data(), nullptr, num_models, blen, ob); break;
    }
  }
}

// Gradient of sum(grad * out) with respect to an elementwise coefficient (inner == 1):
// grad_coef[i] = grad[i] * w[i], for i in [begin, end).
template <typename T, typename G, typename Coef>
void coef_grad_elementwise(const G* grad, const T* w, int64_t begin, int64_t end, Coef* grad_coef) {
  for (int64_t i = begin; i < end; ++i)
    grad_coef[i] = static_cast<Coef>(static_cast<double>(grad[i]) * static_cast<double>(w[i]));
}

// Partial dot product sum_{i in [begin, end)} grad[i] * w[i] in double: the building block of the
// gradient of a coefficient shared by a run of elements (per channel or per tensor).
template <typename T, typename G>
double dot_range(const G* grad, const T* w, int64_t begin, int64_t end) {
  // Four independent partial sums: breaks the dependency chain so the loop pipelines.
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    s0 += static_cast<double>(grad[i]) * static_cast<double>(w[i]);
    s1 += static_cast<double>(grad[i + 1]) * static_cast<double>(w[i + 1]);
    s2 += static_cast<double>(grad[i + 2]) * static_cast<double>(w[i + 2]);
    s3 += static_cast<double>(grad[i + 3]) * static_cast<double>(w[i + 3]);
  }
  for (; i < end; ++i) s0 += static_cast<double>(grad[i]) * static_cast<double>(w[i]);
  return (s0 + s1) + (s2 + s3);
}

}  // namespace kernels
}  // namespace fastmerge

namespace fastmerge {
namespace kernels {

// Two-parent NP Merge with alpha = sigmoid(a): out = alpha * w_a + (1 - alpha) * w_b (in this
// order, so that alpha = 0.5 reproduces the uniform average of the combine op bit for bit).
// `alpha_or_out` holds alpha on entry (one value per element) and the merged weight on exit, so
// the forward needs no memory besides its output.
template <typename T, typename Acc>
void sigmoid_merge_inplace(const T* w_a, const T* w_b, T* alpha_or_out, int64_t begin, int64_t end) {
  for (int64_t e = begin; e < end; ++e) {
    const Acc s = static_cast<Acc>(alpha_or_out[e]);
    alpha_or_out[e] = static_cast<T>(s * static_cast<Acc>(w_a[e]) + (Acc(1) - s) * static_cast<Acc>(w_b[e]));
  }
}

// The same with one alpha per run of `inner` elements (per channel / per tensor).
template <typename T, typename C, typename Acc>
void sigmoid_merge_runs(const T* w_a, const T* w_b, const C* alpha, int64_t inner, int64_t begin, int64_t end,
                        T* out) {
  for (int64_t e = begin; e < end; ++e) {
    const Acc s = static_cast<Acc>(alpha[e / inner]);
    out[e] = static_cast<T>(s * static_cast<Acc>(w_a[e]) + (Acc(1) - s) * static_cast<Acc>(w_b[e]));
  }
}

// Gradient with respect to the logit, one per element: d out / d a = (w_a - w_b) alpha (1 - alpha).
// `alpha_or_grad` holds alpha on entry and the logit gradient on exit.
template <typename T, typename G, typename C>
void sigmoid_merge_grad_inplace(const G* grad, const T* w_a, const T* w_b, C* alpha_or_grad, int64_t begin,
                                int64_t end) {
  for (int64_t e = begin; e < end; ++e) {
    const double s = static_cast<double>(alpha_or_grad[e]);
    alpha_or_grad[e] = static_cast<C>(static_cast<double>(grad[e]) *
                                      (static_cast<double>(w_a[e]) - static_cast<double>(w_b[e])) * s * (1.0 - s));
  }
}

// sum_{e in [begin, end)} grad[e] * (w_a[e] - w_b[e]), in double: the logit gradient of a run,
// before the alpha (1 - alpha) factor.
template <typename T, typename G>
double diff_dot_range(const G* grad, const T* w_a, const T* w_b, int64_t begin, int64_t end) {
  double s0 = 0, s1 = 0;
  int64_t e = begin;
  for (; e + 2 <= end; e += 2) {
    s0 += static_cast<double>(grad[e]) * (static_cast<double>(w_a[e]) - static_cast<double>(w_b[e]));
    s1 += static_cast<double>(grad[e + 1]) * (static_cast<double>(w_a[e + 1]) - static_cast<double>(w_b[e + 1]));
  }
  for (; e < end; ++e) s0 += static_cast<double>(grad[e]) * (static_cast<double>(w_a[e]) - static_cast<double>(w_b[e]));
  return s0 + s1;
}

}  // namespace kernels
}  // namespace fastmerge
