// DELLA's keep mask (MagPrune), one row at a time: along a row of a task vector, an entry's keep
// probability rises linearly with the rank of its magnitude, from density - epsilon (the smallest)
// to density + epsilon (the largest), and the entry is kept when its hashed DARE draw
// (same_init.h) falls below that probability. The ranks come from row_sort.h's radix sort (ties
// by position), not a comparison sort per row (what mergekit runs, and what dominated DELLA).
// Header-only, no torch headers.
#pragma once

#include <cstdint>

#include "kernels/row_sort.h"
#include "kernels/same_init.h"

namespace fastmerge {
namespace kernels {

// DELLA's keep mask of one row: row[0..n) is the task vector's row whose first entry has flat index
// `first` (the draws are indexed by flat position, as DARE's). keep[i] = draw(seed, first + i) / 2^24
// < (density - epsilon) + (rank_i / (n - 1)) * 2 * epsilon, in float64 in this order (the torch
// reference's operations; a single-entry row has position 0).
template <typename T>
inline void magprune_keep_row(const T* row, int64_t n, int64_t first, double density, double epsilon, uint64_t seed,
                              RowSortScratch& scratch, uint8_t* keep) {
  uint32_t* rank = scratch.rank();
  magnitude_ranks(row, n, scratch, rank);
  // the sort's buffers are free again: the row's draws go into one of them (DARE's block kernel)
  int32_t* draws = reinterpret_cast<int32_t*>(scratch.keys());
  dare_draws(seed, first, first + n, draws);
  const double width = static_cast<double>(n - 1);
  const double low = density - epsilon;
  for (int64_t i = 0; i < n; ++i) {
    const double position = n > 1 ? static_cast<double>(rank[i]) / width : 0.0;
    const double probability = low + position * 2.0 * epsilon;
    const double uniform = static_cast<double>(draws[i]) / static_cast<double>(kDareDraws);
    keep[i] = uniform < probability ? 1 : 0;
  }
}

}  // namespace kernels
}  // namespace fastmerge
