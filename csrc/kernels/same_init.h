// Fused TIES and DARE for models fine-tuned from one base (../shared/ALGORITHMS.md section 8), one
// element at a time: every model's task vector d_k = W_k - base is formed in float32 registers and
// never stored, so a merge reads each input once and writes the output once, in its dtype, rounded
// once. Header-only, no torch headers: T and O are any types with float conversions
// (float, c10::Half, c10::BFloat16).
//
// TIES needs a threshold per model (the k-th largest |d_k| of the whole tensor), selected exactly on
// the float32 bits of |d| (non-negative floats order like their bit patterns): from a sample, a
// window that holds it, one pass over the inputs for all models, the select inside the window
// (abs_delta_window_pass; ties at the window's ends are counted, not collected, so the few distinct
// values of bfloat16 task vectors do not flood it). Where the window misses, a radix select: a histogram of the high 15
// bits, then one of the low 16 bits inside the chosen bin (two more passes).
//
// DARE's masks come from a counter-based hash of (seed, element index), so an element's fate does
// not depend on chunking or threads, and fastmerge.ops.same_init reproduces it with torch integer
// ops on any device.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The vectorised kernels below are always inlined into their callers, so that a caller compiled
// for a wider instruction set (csrc/cpu/same_init.cpp's AVX2 variants) vectorises them for it.
#if defined(__GNUC__)
#define FASTMERGE_KERNEL inline __attribute__((always_inline))
#else
#define FASTMERGE_KERNEL inline
#endif

namespace fastmerge {
namespace kernels {

constexpr int kHighBins = 1 << 15;  // |x| clears the sign bit: bits 30..16
constexpr int kLowBins = 1 << 16;   // bits 15..0
constexpr uint32_t kDareDraws = 1u << 24;  // a draw is 24 bits: keep when draw < density * 2^24
constexpr uint32_t kInfBits = 0x7F800000u;  // keys from here up are Inf and NaN

inline uint32_t abs_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u & 0x7FFFFFFFu;
}

// Counts |model - base| by its high bits into bins[0, kHighBins) (added to).
template <typename T>
void abs_delta_histogram(const T* model, const T* base, int64_t begin, int64_t end, int64_t* bins) {
  for (int64_t i = begin; i < end; ++i)
    ++bins[abs_bits(static_cast<float>(model[i]) - static_cast<float>(base[i])) >> 16];
}

// Among entries whose high bits equal `high`, counts |model - base| by its low bits (kLowBins).
template <typename T>
void abs_delta_low_histogram(const T* model, const T* base, int64_t begin, int64_t end, int32_t high, int64_t* bins) {
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

// Elements processed together: the loops below run over a block of elements innermost, so the
// compiler vectorises them (one element at a time, the per-model loops and branches did not).
constexpr int64_t kBlock = 256;

// The sampled select of TIES' thresholds: a sample of every model's keys (|d| as float32 bits)
// gives a window [lo, hi] that holds the k-th largest key with near certainty; one pass over the
// entries then counts the keys above hi, equal to hi and equal to lo (vectorised) and collects
// those strictly inside (lo, hi), a few percent of them, where the exact k-th largest is selected.
// Ties at either end are counted, not collected, so heavily tied tensors stay cheap.
struct SelectWindow {
  uint32_t lo, hi;
};

// What one range of entries contributed for one model.
struct SelectPart {
  int64_t above = 0, at_hi = 0, at_lo = 0;
  int64_t nonfinite = 0;  // keys of NaN/Inf (the model or the base not finite there)
  std::vector<uint32_t> inside;  // the keys in (lo, hi)
  bool overflow = false;         // more than `max_inside` keys were inside: collecting stopped
};

// One pass over entries [begin, end) of every model (the base read once per block) into parts[k].
template <typename T>
FASTMERGE_KERNEL void abs_delta_window_pass(const T* const* models, int num_models, const T* base,
                                           const SelectWindow* windows, int64_t max_inside, SelectPart* parts,
                                           int64_t begin, int64_t end) {
  float b[kBlock];
  uint32_t keys[kBlock], flags[kBlock];
  std::vector<int64_t> used(num_models, 0);  // inside[k][0, used[k]) are collected keys
  for (int k = 0; k < num_models; ++k) parts[k].inside.resize(kBlock);
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t len = end - i0 < kBlock ? end - i0 : kBlock;
    for (int64_t j = 0; j < len; ++j) b[j] = static_cast<float>(base[i0 + j]);
    for (int k = 0; k < num_models; ++k) {
      const T* m = models[k] + i0;
      const uint32_t lo = windows[k].lo, hi = windows[k].hi;
      // keys in (lo, hi): key - lo - 1 < hi - lo - 1 as unsigned; a few per block, flagged here
      // and collected below from the groups of 8 that hold any (no branch per key)
      const uint32_t width = hi > lo ? hi - lo - 1 : 0;
      uint32_t above = 0, at_hi = 0, at_lo = 0, inside = 0, nonfinite = 0;
      for (int64_t j = 0; j < len; ++j) {
        keys[j] = abs_bits(static_cast<float>(m[j]) - b[j]);
        nonfinite += keys[j] >= kInfBits;
        above += keys[j] > hi;
        at_hi += keys[j] == hi;
        at_lo += keys[j] == lo;
        flags[j] = keys[j] - lo - 1 < width;
        inside += flags[j];
      }
      SelectPart& part = parts[k];
      part.above += above;
      part.at_hi += at_hi;
      part.at_lo += at_lo;
      part.nonfinite += nonfinite;
      if (part.overflow || inside == 0) continue;
      if (used[k] + kBlock > static_cast<int64_t>(part.inside.size())) part.inside.resize(2 * part.inside.size());
      uint32_t* out = part.inside.data();
      int64_t n = used[k];
      for (int64_t j0 = 0; j0 < len; j0 += 8) {
        const int64_t j1 = std::min<int64_t>(len, j0 + 8);
        uint32_t any = 0;
        for (int64_t j = j0; j < j1; ++j) any |= flags[j];
        if (!any) continue;
        for (int64_t j = j0; j < j1; ++j) {
          out[n] = keys[j];  // written unconditionally, kept by advancing the count
          n += flags[j];
        }
      }
      used[k] = n;
      if (n > max_inside) part.overflow = true;
    }
  }
  for (int k = 0; k < num_models; ++k) parts[k].inside.resize(parts[k].overflow ? 0 : used[k]);
}

// TIES for entries [begin, end): task vectors trimmed to |d_k| >= threshold_k, the sign elected by
// sum_k w_k d_k (positive where that sum is >= 0, as mergekit elects it), the kept weighted entries
// w_k d_k of that sign summed and (normalize) divided by the sum of their weights (1 where no entry
// agrees), out = base + scale * that. The order of the float operations is that of the torch
// reference (fastmerge.ops.same_init.ties_merge_reference) and of mergekit's TIES, so they agree
// to the bit on float32 inputs.
template <typename T, typename O>
FASTMERGE_KERNEL void ties_merge(const T* const* models, int num_models, const T* base, const float* weights,
                                 const float* thresholds, float scale, bool normalize, O* out, int64_t begin,
                                 int64_t end) {
  // the trimmed task vectors of one block, for every model (formed once, read twice)
  std::vector<float> trimmed(static_cast<size_t>(num_models) * kBlock);
  float b[kBlock], elected[kBlock], total[kBlock], count[kBlock];
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t len = end - i0 < kBlock ? end - i0 : kBlock;
    for (int64_t j = 0; j < len; ++j) {
      b[j] = static_cast<float>(base[i0 + j]);
      elected[j] = total[j] = count[j] = 0.0f;
    }
    for (int k = 0; k < num_models; ++k) {
      const T* m = models[k] + i0;
      float* t = trimmed.data() + k * kBlock;
      const float w = weights[k], thr = thresholds[k];
      for (int64_t j = 0; j < len; ++j) {
        const float d = static_cast<float>(m[j]) - b[j];
        t[j] = std::fabs(d) >= thr ? d : 0.0f;
        elected[j] += w * t[j];
      }
    }
    for (int k = 0; k < num_models; ++k) {
      const float* t = trimmed.data() + k * kBlock;
      const float w = weights[k];
      for (int64_t j = 0; j < len; ++j) {
        // the weighted entry nonzero and of the elected sign (zero sums elect +); bitwise & and |
        // keep it branch-free (random signs mispredict every other branch) and vectorisable
        const float wt = w * t[j];
        const bool agree = ((wt > 0.0f) & (elected[j] >= 0.0f)) | ((wt < 0.0f) & (elected[j] < 0.0f));
        // select, then add: under -ftrapping-math (the default) the compiler will not if-convert,
        // so not vectorise, a conditional float operation
        total[j] += agree ? wt : 0.0f;
        count[j] += agree ? w : 0.0f;
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      const float mixed = normalize ? total[j] / (count[j] != 0.0f ? count[j] : 1.0f) : total[j];
      out[i0 + j] = static_cast<O>(b[j] + scale * mixed);
    }
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

// DARE's key for the model with 64-bit seed `seed` and the indices whose high 32 bits are `high`.
inline uint32_t dare_key(uint64_t seed, uint32_t high) {
  return hash32(hash32(static_cast<uint32_t>(seed) ^ high) ^ static_cast<uint32_t>(seed >> 32));
}

// DARE's 24-bit draw for element i: one hash of the index's low word and the key (one multiply
// pair per element and model; the key changes once every 2^32 elements).
inline uint32_t dare_draw(uint64_t seed, uint64_t i) {
  return hash32(static_cast<uint32_t>(i) ^ dare_key(seed, static_cast<uint32_t>(i >> 32))) >> 8;
}

// DARE's draws alone, for entries [begin, end): draws[i - begin] = draw(seed, i), for the masks of
// mergekit's DARE and DELLA variants (which fastmerge runs with its own draws).
FASTMERGE_KERNEL void dare_draws(uint64_t seed, int64_t begin, int64_t end, int32_t* draws) {
  for (int64_t i0 = begin; i0 < end;) {
    const int64_t i1 = std::min(end, (i0 / kBlock + 1) * kBlock);  // within one 2^32 range, as below
    const uint32_t key = dare_key(seed, static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 32));
    const uint32_t low0 = static_cast<uint32_t>(i0);
    int32_t* d = draws + (i0 - begin);
    for (int64_t j = 0; j < i1 - i0; ++j) d[j] = static_cast<int32_t>(hash32((low0 + static_cast<uint32_t>(j)) ^ key) >> 8);
    i0 = i1;
  }
}

// DARE for entries [begin, end): out = base + sum_k c_k * keep_k * d_k with keep_k = draw < keep_below
// and c_k = scale * w_k / density (the rescale of the survivors).
template <typename T, typename O>
FASTMERGE_KERNEL void dare_merge(const T* const* models, int num_models, const T* base, const float* coefficients,
                                 const uint64_t* seeds, uint32_t keep_below, O* out, int64_t begin, int64_t end) {
  float b[kBlock], acc[kBlock], keep[kBlock];
  for (int64_t i0 = begin; i0 < end;) {
    // blocks end at multiples of kBlock, so none crosses a multiple of 2^32 and the index's high
    // word is one value per block: the hash loop is then pure 32-bit arithmetic and vectorises
    const int64_t i1 = std::min(end, (i0 / kBlock + 1) * kBlock);
    const int64_t len = i1 - i0;
    const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 32);
    const uint32_t low0 = static_cast<uint32_t>(i0);
    for (int64_t j = 0; j < len; ++j) {
      b[j] = static_cast<float>(base[i0 + j]);
      acc[j] = 0.0f;
    }
    for (int k = 0; k < num_models; ++k) {
      const T* m = models[k] + i0;
      const float c = coefficients[k];
      const uint32_t key = dare_key(seeds[k], high);
      // the mask first, in a loop of integer arithmetic alone, then the floats: fused into one
      // loop, the compiler kept a branch per entry (taken at random: mispredicted half the time)
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t draw = hash32((low0 + static_cast<uint32_t>(j)) ^ key) >> 8;  // = dare_draw(seeds[k], i0 + j)
        keep[j] = static_cast<int32_t>(draw) < static_cast<int32_t>(keep_below) ? 1.0f : 0.0f;  // both < 2^31
      }
      for (int64_t j = 0; j < len; ++j) acc[j] += ((static_cast<float>(m[j]) - b[j]) * keep[j]) * c;
    }
    for (int64_t j = 0; j < len; ++j) out[i0 + j] = static_cast<O>(b[j] + acc[j]);
    i0 = i1;
  }
}

}  // namespace kernels
}  // namespace fastmerge
