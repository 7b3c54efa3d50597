// Fused TIES and DARE for models fine-tuned from one base (../shared/ALGORITHMS.md section 8), one
// element at a time: every model's task vector d_k = W_k - base is formed in float32 registers and
// never stored, so a merge reads each input once and writes the output once, in its dtype, rounded
// once. Header-only, no torch headers: T and O are any types with float conversions
// (float, c10::Half, c10::BFloat16).
//
// TIES needs a threshold per model (the k-th largest |d_k| of the whole tensor): an exact radix
// select on the float32 bits of |d| (non-negative floats order like their bit patterns), in two
// histogram passes (the high 15 bits, then the low 16 bits inside the chosen bin).
//
// DARE's masks come from a counter-based hash of (seed, element index), so an element's fate does
// not depend on chunking or threads, and fastmerge.merge.same_init reproduces it with torch integer
// ops on any device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastmerge {
namespace kernels {

constexpr int kHighBins = 1 << 15;  // |x| clears the sign bit: bits 30..16
constexpr int kLowBins = 1 << 16;   // bits 15..0
constexpr uint32_t kDareDraws = 1u << 24;  // a draw is 24 bits: keep when draw < density * 2^24

inline uint32_t abs_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u & 0x7FFFFFFFu;
}

// Counts |model - base| by its high bits (pass high < 0) or, among entries whose high bits equal
// `high`, by its low bits. `bins` has kHighBins or kLowBins entries and is added to.
template <typename T>
void abs_delta_histogram(const T* model, const T* base, int64_t begin, int64_t end, int32_t high, int64_t* bins) {
  if (high < 0) {
    for (int64_t i = begin; i < end; ++i) {
      ++bins[abs_bits(static_cast<float>(model[i]) - static_cast<float>(base[i])) >> 16];
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t bits = abs_bits(static_cast<float>(model[i]) - static_cast<float>(base[i]));
    if (static_cast<int32_t>(bits >> 16) == high) ++bins[bits & 0xFFFFu];
  }
}

// The bin (counted down from the top) where the running count reaches k >= 1; `above` receives the
// number of entries in higher bins.
inline int32_t bin_of_kth_largest(const int64_t* bins, int32_t num_bins, int64_t k, int64_t* above) {
  int64_t seen = 0;
  for (int32_t b = num_bins - 1; b > 0; --b) {
    if (seen + bins[b] >= k) {
      *above = seen;
      return b;
    }
    seen += bins[b];
  }
  *above = seen;
  return 0;
}

inline float float_from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// TIES for entries [begin, end): task vectors trimmed to |d_k| >= threshold_k, the sign elected by
// sum_k w_k d_k, the w-weighted mean of the kept entries that agree with it, out = base + scale *
// mean. The order of the float operations is that of the torch reference (same_init._ties), so the
// two agree to the bit.
template <typename T, typename O>
void ties_merge(const T* const* models, int num_models, const T* base, const float* weights,
                const float* thresholds, float scale, O* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float b = static_cast<float>(base[i]);
    float elected = 0.0f;
    for (int k = 0; k < num_models; ++k) {
      const float d = static_cast<float>(models[k][i]) - b;
      elected += weights[k] * (std::fabs(d) >= thresholds[k] ? d : 0.0f);
    }
    float total = 0.0f, count = 0.0f;
    for (int k = 0; k < num_models; ++k) {
      const float d = static_cast<float>(models[k][i]) - b;
      const bool agree = std::fabs(d) >= thresholds[k] && d != 0.0f && elected != 0.0f && (d > 0.0f) == (elected > 0.0f);
      total += agree ? weights[k] * d : 0.0f;
      count += agree ? weights[k] : 0.0f;
    }
    out[i] = static_cast<O>(b + scale * (count != 0.0f ? total / count : 0.0f));
  }
}

// A 32-bit integer hash whose multipliers stay below 2^27, so x * c fits in a signed 64-bit integer
// and torch can evaluate the same function exactly (same_init.dare_draws).
constexpr uint32_t kHashMultiplier = 0x045d9f3bu;
inline uint32_t hash32(uint32_t x) {
  x = (x ^ (x >> 16)) * kHashMultiplier;
  x = (x ^ (x >> 16)) * kHashMultiplier;
  return x ^ (x >> 16);
}

// DARE's 24-bit draw for element i of the model whose 64-bit seed is `seed`.
inline uint32_t dare_draw(uint64_t seed, uint64_t i) {
  const uint32_t h = hash32(static_cast<uint32_t>(i) ^ static_cast<uint32_t>(seed));
  return hash32(h ^ static_cast<uint32_t>(i >> 32) ^ static_cast<uint32_t>(seed >> 32)) >> 8;
}

// DARE for entries [begin, end): out = base + sum_k c_k * keep_k * d_k with keep_k = draw < keep_below
// and c_k = scale * w_k / density (the rescale of the survivors).
template <typename T, typename O>
void dare_merge(const T* const* models, int num_models, const T* base, const float* coefficients,
                const uint64_t* seeds, uint32_t keep_below, O* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float b = static_cast<float>(base[i]);
    float acc = 0.0f;
    for (int k = 0; k < num_models; ++k) {
      const bool keep = dare_draw(seeds[k], static_cast<uint64_t>(i)) < keep_below;
      acc += keep ? (static_cast<float>(models[k][i]) - b) * coefficients[k] : 0.0f;
    }
    out[i] = static_cast<O>(b + acc);
  }
}

}  // namespace kernels
}  // namespace fastmerge
