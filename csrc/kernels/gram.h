// The Gram matrix of k tensors (or of their differences from a base), in float64, over one range of
// elements: G[i][j] += sum_e d_i[e] d_j[e], d_i = x_i - base. SLERP, Model Stock, NuSLERP, Multi-SLERP
// and the Karcher mean take every coefficient they need from it (fastmerge/merging/methods/span.py), so
// this one pass replaces the norms and dot products that mergekit computes tensor by tensor.
// Header-only, no torch headers: T is any type with a float conversion (float, c10::Half,
// c10::BFloat16).
//
// Each block of kGramBlock elements is widened to float64 once per input; each pair's dot product then
// runs over the block in kGramLanes independent partial sums (a vectorisable loop without reassociating
// a single sum), added to the pair's total in a fixed order: the result does not depend on threads.
#pragma once

#include <cstdint>

namespace fastmerge {
namespace kernels {

constexpr int kGramBlock = 256;
constexpr int kGramLanes = 8;
constexpr int kGramMaxModels = 16;

// Adds the Gram matrix of models[0..k) (minus base, when base is not null) over [begin, end) to
// gram[k * k] (row-major, both triangles).
template <typename T>
inline void gram_range(const T* const* models, int k, const T* base, int64_t begin, int64_t end, double* gram) {
  double rows[kGramMaxModels][kGramBlock];
  for (int64_t start = begin; start < end; start += kGramBlock) {
    const int n = static_cast<int>(end - start < kGramBlock ? end - start : kGramBlock);
    for (int i = 0; i < k; ++i) {
      const T* x = models[i] + start;
      if (base != nullptr) {
        const T* b = base + start;
        for (int e = 0; e < n; ++e) rows[i][e] = static_cast<double>(static_cast<float>(x[e])) -
                                                 static_cast<double>(static_cast<float>(b[e]));
      } else {
        for (int e = 0; e < n; ++e) rows[i][e] = static_cast<double>(static_cast<float>(x[e]));
      }
      for (int e = n; e < kGramBlock; ++e) rows[i][e] = 0.0;  // a short last block: zeros add nothing
    }
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j <= i; ++j) {
        double lanes[kGramLanes] = {0.0};
        for (int e = 0; e < kGramBlock; e += kGramLanes)
          for (int l = 0; l < kGramLanes; ++l) lanes[l] += rows[i][e + l] * rows[j][e + l];
        double dot = 0.0;
        for (int l = 0; l < kGramLanes; ++l) dot += lanes[l];
        gram[i * k + j] += dot;
      }
    }
  }
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < i; ++j) gram[j * k + i] = gram[i * k + j];
}

}  // namespace kernels
}  // namespace fastmerge
