// DELLA's keep mask (MagPrune), one row at a time: along a row of a task vector, an entry's keep
// probability rises linearly with the rank of its magnitude, from density - epsilon (the smallest)
// to density + epsilon (the largest), and the entry is kept when its hashed DARE draw
// (same_init.h) falls below that probability. Header-only, no torch headers: T is float or any
// 2-byte float type (c10::Half, c10::BFloat16), read through its bits.
//
// The ranks come from a stable LSD radix sort of the magnitudes' bit patterns (non-negative floats
// order like their bits), 8 bits per pass, passes whose digit every entry shares skipped: two
// passes for 16-bit floats, at most four for float32, instead of a comparison sort per row (what
// mergekit runs, and what dominated fastmerge's DELLA). Entries of equal magnitude rank by position;
// NaN magnitudes rank above every number, as torch.sort places them.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels/same_init.h"

namespace fastmerge {
namespace kernels {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// The magnitude's bit pattern of a float32 or 16-bit float: its bits without the sign.
template <typename T>
inline uint32_t magnitude_key(const T& value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "magnitude_key: 16- or 32-bit floats only");
  if constexpr (sizeof(T) == 4) {
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    return bits & 0x7FFFFFFFu;
  } else {
    uint16_t bits;
    std::memcpy(&bits, &value, 2);
    return bits & 0x7FFFu;
  }
}

// rank[i] = #{j : key[j] < key[i]} + #{j < i : key[j] == key[i]} for i in [0, n): a stable LSD radix
// sort of the keys (key_bits wide) into `order`, inverted. keys, order and scratch hold n entries;
// keys and scratch are overwritten.
inline void stable_ranks(uint32_t* keys, int64_t n, int key_bits, uint32_t* order, uint32_t* scratch_keys,
                         uint32_t* scratch_order, uint32_t* rank) {
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  for (int shift = 0; shift < key_bits; shift += kRadixBits) {
    int64_t offset[kRadixBins] = {0};
    for (int64_t i = 0; i < n; ++i) ++offset[(keys[i] >> shift) & (kRadixBins - 1)];
    bool one_bin = false;
    for (int d = 0; d < kRadixBins; ++d) one_bin |= offset[d] == n;
    if (one_bin) continue;  // every key has this digit: the order stands
    int64_t start = 0;
    for (int d = 0; d < kRadixBins; ++d) {
      const int64_t count = offset[d];
      offset[d] = start;
      start += count;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t to = offset[(keys[i] >> shift) & (kRadixBins - 1)]++;
      scratch_keys[to] = keys[i];
      scratch_order[to] = order[i];
    }
    std::swap(keys, scratch_keys);
    std::swap(order, scratch_order);
  }
  for (int64_t p = 0; p < n; ++p) rank[order[p]] = static_cast<uint32_t>(p);
}

// Per-thread buffers of stable_ranks for rows of up to `capacity` entries.
struct RankScratch {
  explicit RankScratch(int64_t capacity) : storage(static_cast<size_t>(5 * capacity)), n(capacity) {}
  uint32_t* keys() { return storage.data(); }
  uint32_t* order() { return storage.data() + n; }
  uint32_t* scratch_keys() { return storage.data() + 2 * n; }
  uint32_t* scratch_order() { return storage.data() + 3 * n; }
  uint32_t* rank() { return storage.data() + 4 * n; }
  std::vector<uint32_t> storage;
  int64_t n;
};

// DELLA's keep mask of one row: row[0..n) is the task vector's row whose first entry has flat index
// `first` (the draws are indexed by flat position, as DARE's). keep[i] = draw(seed, first + i) / 2^24
// < (density - epsilon) + (rank_i / (n - 1)) * 2 * epsilon, in float64 in this order (the torch
// reference's operations; a single-entry row has position 0).
template <typename T>
inline void magprune_keep_row(const T* row, int64_t n, int64_t first, double density, double epsilon, uint64_t seed,
                              RankScratch& scratch, uint8_t* keep) {
  uint32_t* keys = scratch.keys();
  for (int64_t i = 0; i < n; ++i) keys[i] = magnitude_key(row[i]);
  uint32_t* rank = scratch.rank();
  stable_ranks(keys, n, sizeof(T) == 4 ? 32 : 16, scratch.order(), scratch.scratch_keys(), scratch.scratch_order(),
               rank);
  const double width = static_cast<double>(n - 1);
  const double low = density - epsilon;
  for (int64_t i = 0; i < n; ++i) {
    const double position = n > 1 ? static_cast<double>(rank[i]) / width : 0.0;
    const double probability = low + position * 2.0 * epsilon;
    const double uniform = static_cast<double>(dare_draw(seed, static_cast<uint64_t>(first + i))) /
                           static_cast<double>(kDareDraws);
    keep[i] = uniform < probability ? 1 : 0;
  }
}

}  // namespace kernels
}  // namespace fastmerge
