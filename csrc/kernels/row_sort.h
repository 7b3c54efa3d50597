// Sorting one row of magnitudes by their bit patterns (non-negative floats order like their bits):
// a stable LSD radix sort, passes whose digit every entry shares skipped (two 8-bit passes for
// 16-bit floats, three 11-bit passes for float32), instead of a comparison sort per row.
// Entries of equal magnitude keep their order (position); NaN magnitudes sort above every number,
// as torch.sort places them. Header-only, no torch headers: T is float or any 2-byte float type
// (c10::Half, c10::BFloat16), read through its bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace fastmerge {
namespace kernels {

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

template <typename T>
constexpr int magnitude_key_bits() {
  return sizeof(T) == 4 ? 32 : 16;
}

// Bits per pass: 16-bit keys in two 8-bit passes; 32-bit keys in three 11-bit passes (a
// 2048-entry histogram still fits the L1 cache, and one pass fewer than 8-bit digits).
template <typename T>
constexpr int radix_digit_bits() {
  return sizeof(T) == 4 ? 11 : 8;
}

// Rows shorter than this sort with 8-bit digits: four passes of 256 bins beat three of 2048 there.
constexpr int64_t kShortRow = 8192;

// Per-thread buffers for rows of up to `capacity` entries.
struct RowSortScratch {
  explicit RowSortScratch(int64_t capacity) : storage(static_cast<size_t>(5 * capacity)), n(capacity) {}
  uint32_t* keys() { return storage.data(); }
  uint32_t* order() { return storage.data() + n; }
  uint32_t* scratch_keys() { return storage.data() + 2 * n; }
  uint32_t* scratch_order() { return storage.data() + 3 * n; }
  uint32_t* rank() { return storage.data() + 4 * n; }
  std::vector<uint32_t> storage;
  int64_t n;
};

// Sorts keys[0..n) (key_bits wide) ascending, stably; with `order` (else nullptr) the entries'
// original positions move along. Returns the buffer that holds the sorted keys (keys or
// scratch_keys; `order`'s likewise through *sorted_order).
template <int DigitBits>
inline uint32_t* radix_sort(uint32_t* keys, int64_t n, int key_bits, uint32_t* scratch_keys, uint32_t* order,
                            uint32_t* scratch_order, uint32_t** sorted_order) {
  constexpr int kBins = 1 << DigitBits;
  for (int shift = 0; shift < key_bits; shift += DigitBits) {
    uint32_t offset[kBins] = {0};  // n < 2^32 (checked by the callers)
    for (int64_t i = 0; i < n; ++i) ++offset[(keys[i] >> shift) & (kBins - 1)];
    bool one_bin = false;
    for (int d = 0; d < kBins; ++d) one_bin |= offset[d] == n;
    if (one_bin) continue;  // every key has this digit: the order stands
    uint32_t start = 0;
    for (int d = 0; d < kBins; ++d) {
      const uint32_t count = offset[d];
      offset[d] = start;
      start += count;
    }
    if (order != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t to = offset[(keys[i] >> shift) & (kBins - 1)]++;
        scratch_keys[to] = keys[i];
        scratch_order[to] = order[i];
      }
      std::swap(order, scratch_order);
    } else {
      for (int64_t i = 0; i < n; ++i) scratch_keys[offset[(keys[i] >> shift) & (kBins - 1)]++] = keys[i];
    }
    std::swap(keys, scratch_keys);
  }
  if (sorted_order != nullptr) *sorted_order = order;
  return keys;
}

// A row's magnitude keys sorted (radix_sort, with `order` when given): 8-bit digits for rows
// shorter than kShortRow (a 2048-bin histogram per pass costs more than the row itself there),
// T's own digits otherwise. Either way the same stable order.
template <typename T>
inline uint32_t* sort_magnitude_keys(uint32_t* keys, int64_t n, RowSortScratch& scratch, uint32_t* order,
                                     uint32_t** sorted_order) {
  uint32_t* scratch_order = order != nullptr ? scratch.scratch_order() : nullptr;
  if (n < kShortRow)
    return radix_sort<8>(keys, n, magnitude_key_bits<T>(), scratch.scratch_keys(), order, scratch_order, sorted_order);
  return radix_sort<radix_digit_bits<T>()>(keys, n, magnitude_key_bits<T>(), scratch.scratch_keys(), order,
                                           scratch_order, sorted_order);
}

// rank[i] = #{j : |row[j]| < |row[i]|} + #{j < i : |row[j]| == |row[i]|} for a row of n entries.
template <typename T>
inline void magnitude_ranks(const T* row, int64_t n, RowSortScratch& scratch, uint32_t* rank) {
  uint32_t* keys = scratch.keys();
  uint32_t* order = scratch.order();
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = magnitude_key(row[i]);
    order[i] = static_cast<uint32_t>(i);
  }
  uint32_t* sorted_order = nullptr;
  sort_magnitude_keys<T>(keys, n, scratch, order, &sorted_order);
  for (int64_t p = 0; p < n; ++p) rank[sorted_order[p]] = static_cast<uint32_t>(p);
}

// out[j] = the magnitude of ascending rank positions[j] (0 <= positions[j] < n) in a row of n
// entries, as the magnitude's bits (the caller reinterprets them as T).
// With `squares` (else nullptr), *squares = the row's sum of squares in float64, each square taken
// in float64, summed in a fixed order (four interleaved partial sums: the same bits on every run and
// for any split of the rows between threads).
template <typename T>
inline void magnitude_order_statistics(const T* row, int64_t n, const int64_t* positions, int64_t count,
                                       RowSortScratch& scratch, uint32_t* out, double* squares = nullptr) {
  uint32_t* keys = scratch.keys();
  for (int64_t i = 0; i < n; ++i) keys[i] = magnitude_key(row[i]);
  if (squares != nullptr) {
    double partial[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (int k = 0; k < 4; ++k) {
        const double v = static_cast<double>(static_cast<float>(row[i + k]));
        partial[k] += v * v;
      }
    for (; i < n; ++i) {
      const double v = static_cast<double>(static_cast<float>(row[i]));
      partial[i % 4] += v * v;
    }
    *squares = (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }
  const uint32_t* sorted = sort_magnitude_keys<T>(keys, n, scratch, nullptr, nullptr);
  for (int64_t j = 0; j < count; ++j) out[j] = sorted[positions[j]];
}

}  // namespace kernels
}  // namespace fastmerge
