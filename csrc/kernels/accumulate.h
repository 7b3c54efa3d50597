// Float64 sums of float32 (or float64) parts, in order: total[e] = ((total[e] + p0[e]) + p1[e]) + ...
// with every part widened exactly, the same bits as `total += part.double()` one part after another,
// in one pass over memory instead of two per part (weight matching's cost matrices: many members'
// float32 products summed in float64). Header-only, no torch headers.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastmerge {
namespace kernels {

// Elements per block: the block's float64 accumulators stay in the L1 cache while every part is
// added, and the inner loop (one part, one block) vectorises.
constexpr int64_t kAccumulateBlock = 512;

// Elements [begin, end) of total; `fresh`: the total starts at zero (its memory is not read).
template <typename P>
inline void accumulate_parts(double* total, const P* const* parts, int64_t count, int64_t begin, int64_t end,
                             bool fresh) {
  double acc[kAccumulateBlock];
  for (int64_t b = begin; b < end; b += kAccumulateBlock) {
    const int64_t len = std::min(kAccumulateBlock, end - b);
    for (int64_t e = 0; e < len; ++e) acc[e] = fresh ? 0.0 : total[b + e];
    for (int64_t k = 0; k < count; ++k) {
      const P* __restrict part = parts[k] + b;
      for (int64_t e = 0; e < len; ++e) acc[e] += static_cast<double>(part[e]);
    }
    std::copy(acc, acc + len, total + b);
  }
}

}  // namespace kernels
}  // namespace fastmerge
