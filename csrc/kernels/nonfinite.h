// Counting NaN and Inf entries by their bit pattern: an IEEE float is non-finite exactly when all
// its exponent bits are set. Header-only, no torch headers.
//
// Comparing bits instead of values lets the compiler vectorise one loop for every float width
// (float64, float32, float16, bfloat16 differ only in the integer type and the mask), and it reads
// each element once: the check runs at memory speed, cheap enough to guard every tensor of a
// checkpoint merge.
#pragma once

#include <cstdint>

namespace fastmerge {
namespace kernels {

// Exponent mask of the float type whose bits are `Bits` wide (bfloat16 has float32's exponent).
constexpr uint64_t kExponentF64 = 0x7FF0000000000000ull;
constexpr uint32_t kExponentF32 = 0x7F800000u;
constexpr uint16_t kExponentF16 = 0x7C00u;
constexpr uint16_t kExponentBF16 = 0x7F80u;

// Number of entries in [begin, end) whose exponent bits are all set (NaN or +-Inf).
template <typename Bits>
int64_t count_nonfinite_bits(const Bits* bits, int64_t begin, int64_t end, Bits exponent_mask) {
  int64_t count = 0;
  for (int64_t i = begin; i < end; ++i) {
    count += static_cast<int64_t>((bits[i] & exponent_mask) == exponent_mask);
  }
  return count;
}

}  // namespace kernels
}  // namespace fastmerge
