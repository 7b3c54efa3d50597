// CPU kernels of fastmerge::abs_delta_kth_largest, ties_merge_out and dare_merge_out: the fused
// same-initialisation merges of kernels/same_init.h, parallel over element ranges; and of
// fastmerge::gram (kernels/gram.h), the inner products behind Model Stock and the SLERP family,
// and of fastmerge::dare_draws_out. Inputs are float32, float16 or bfloat16 (all of one dtype),
// the output any of these.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/gram.h"
#include "kernels/same_init.h"

namespace fastmerge {
namespace {

namespace kn = kernels;
constexpr int64_t kGrain = 1 << 15;

// The dtypes the ops take (float32, float16, bfloat16): no float64 instantiations, which the input
// checks refuse anyway.
#define FASTMERGE_DISPATCH_FUSED(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

// Every vectorised kernel twice: for the baseline x86-64 instruction set (SSE2) and for AVX2,
// chosen when the CPU has it. The kernels are always inlined (FASTMERGE_KERNEL), so each variant's
// loops are vectorised for its own instruction set. Not FMA: a fused multiply-add rounds once where
// the torch references round twice, and the kernels equal them to the bit.
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTMERGE_TARGET_AVX2 __attribute__((target("avx2")))
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#else
#define FASTMERGE_TARGET_AVX2
bool cpu_has_avx2() { return false; }
#endif

#define FASTMERGE_ISA_VARIANTS(NAME, KERNEL)                                     \
  template <typename... Args>                                                    \
  void NAME##_baseline(Args... args) {                                           \
    KERNEL(args...);                                                             \
  }                                                                              \
  template <typename... Args>                                                    \
  FASTMERGE_TARGET_AVX2 void NAME##_avx2(Args... args) {                         \
    KERNEL(args...);                                                             \
  }                                                                              \
  template <typename... Args>                                                    \
  void NAME(Args... args) {                                                      \
    if (cpu_has_avx2())                                                          \
      NAME##_avx2(args...);                                                      \
    else                                                                         \
      NAME##_baseline(args...);                                                  \
  }

FASTMERGE_ISA_VARIANTS(window_pass, kn::abs_delta_window_pass)
FASTMERGE_ISA_VARIANTS(ties_merge, kn::ties_merge)
FASTMERGE_ISA_VARIANTS(dare_merge, kn::dare_merge)
FASTMERGE_ISA_VARIANTS(gram_range, kn::gram_range)
FASTMERGE_ISA_VARIANTS(dare_draws, kn::dare_draws)

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_inputs(const char* op, at::TensorList models, const at::Tensor& base) {
  TORCH_CHECK(!models.empty(), op, ": needs at least one model tensor");
  TORCH_CHECK(supported(base.scalar_type()), op, ": base must be float32, float16 or bfloat16, got ", base.scalar_type());
  for (size_t k = 0; k < models.size(); ++k) {
    TORCH_CHECK(models[k].scalar_type() == base.scalar_type() && models[k].sizes() == base.sizes(), op, ": models[",
                k, "] is ", models[k].scalar_type(), " of shape ", models[k].sizes(), ", base is ",
                base.scalar_type(), " of shape ", base.sizes(), "; they must match");
    TORCH_CHECK(models[k].device().is_cpu(), op, ": models[", k, "] must be on the CPU");
  }
}

void check_out(const char* op, const at::Tensor& base, const at::Tensor& out) {
  TORCH_CHECK(supported(out.scalar_type()), op, ": out must be float32, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == base.sizes() && out.is_contiguous(), op, ": out must be a contiguous tensor of shape ",
              base.sizes(), ", got ", out.sizes());
}

// Contiguous views of the models (copies only for strided inputs, which checkpoints never are).
std::vector<at::Tensor> contiguous(at::TensorList models) {
  std::vector<at::Tensor> result;
  result.reserve(models.size());
  for (const at::Tensor& m : models) result.push_back(m.contiguous());
  return result;
}

// Runs f(begin, end, bins) over [0, n) in one range per thread, each with its own zeroed histogram
// of `num_bins`, and returns their sum.
template <typename F>
std::vector<int64_t> histogram(int64_t n, int num_bins, const F& f) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + kGrain - 1) / kGrain));
  std::vector<std::vector<int64_t>> partial(parts, std::vector<int64_t>(num_bins, 0));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(n * p / parts, n * (p + 1) / parts, partial[p].data());
  });
  std::vector<int64_t> total(num_bins, 0);
  for (const auto& h : partial)
    for (int b = 0; b < num_bins; ++b) total[b] += h[b];
  return total;
}

// Below this many entries a threshold is selected from all the keys directly.
constexpr int64_t kSelectAllBelow = 1 << 16;
// The window of the sampled select: the sampled keys this many standard deviations of a sampled
// rank (binomial) either side of k's rank. A sample takes at most one entry in kEntriesPerSample
// (a sample's random reads cost several times a pass's sequential ones), and at least kMinSample
// entries, or the radix select runs instead.
constexpr double kWindowSigmas = 4.0;
constexpr int64_t kEntriesPerSample = 32;
constexpr int64_t kMinSample = 1024;

// The keys of every model on `num` entries: one per stratum of n / num entries, at a hashed
// offset inside it (a strided sample could alias with the rows of a weight matrix).
template <typename T>
std::vector<std::vector<uint32_t>> sample_keys(const std::vector<const T*>& models, const T* base, int64_t n,
                                               int64_t num) {
  std::vector<std::vector<uint32_t>> keys(models.size(), std::vector<uint32_t>(num));
  for (int64_t j = 0; j < num; ++j) {
    const int64_t start = j * n / num, stride = (j + 1) * n / num - start;
    const int64_t i = start + static_cast<int64_t>(kn::hash32(static_cast<uint32_t>(j)) % static_cast<uint64_t>(stride));
    const float b = static_cast<float>(base[i]);
    for (size_t k = 0; k < models.size(); ++k) keys[k][j] = kn::abs_bits(static_cast<float>(models[k][i]) - b);
  }
  return keys;
}

// The (r+1)-th largest of `keys` (reorders them).
uint32_t nth_largest(std::vector<uint32_t>& keys, int64_t r) {
  std::nth_element(keys.begin(), keys.begin() + r, keys.end(), std::greater<uint32_t>());
  return keys[r];
}

// The window [lo, hi] of the k-th largest key among n from a sample of keys.
kn::SelectWindow window_from_sample(std::vector<uint32_t>& sample, int64_t n, int64_t k) {
  const double s = static_cast<double>(sample.size()), q = static_cast<double>(k) / static_cast<double>(n);
  const double margin = kWindowSigmas * std::sqrt(s * q * (1.0 - q)) + 2.0;
  const double top = q * s - margin, bottom = q * s + margin;  // ranks counted from the largest
  kn::SelectWindow w;
  w.hi = top < 0.0 ? 0xFFFFFFFFu : nth_largest(sample, static_cast<int64_t>(top));
  w.lo = bottom >= s - 1.0 ? 0u : nth_largest(sample, static_cast<int64_t>(bottom));
  return w;
}

// The k-th largest key from the window pass's counts, or false where the window misses it (or
// more keys than the pass would collect fell inside).
bool select_in_window(const kn::SelectWindow& w, std::vector<kn::SelectPart>& parts, int64_t k, uint32_t* key) {
  int64_t above = 0, at_hi = 0, at_lo = 0, inside = 0;
  bool overflow = false;
  for (const auto& p : parts) {
    above += p.above, at_hi += p.at_hi, at_lo += p.at_lo, inside += static_cast<int64_t>(p.inside.size());
    overflow |= p.overflow;
  }
  int64_t r = k - above;  // the rank of the k-th largest inside [lo, hi]
  if (r <= 0) return false;
  if (r <= at_hi) return *key = w.hi, true;
  r -= at_hi;
  if (w.lo == w.hi) return false;  // at_lo counted the same keys as at_hi
  if (overflow) return false;      // (the inside keys are incomplete)
  if (r <= inside) {
    std::vector<uint32_t> all;
    all.reserve(inside);
    for (const auto& p : parts) all.insert(all.end(), p.inside.begin(), p.inside.end());
    *key = nth_largest(all, r - 1);
    return true;
  }
  r -= inside;
  if (r <= at_lo) return *key = w.lo, true;
  return false;
}

// The exact k-th largest key of one model by a radix select: two passes over the inputs. Adds the
// number of non-finite keys (the top bins of the first pass) to *nonfinite when it is given.
template <typename T>
uint32_t radix_select(const T* mp, const T* bp, int64_t n, int64_t k, int64_t* nonfinite) {
  const auto high_bins = histogram(n, kn::kHighBins, [&](int64_t s, int64_t e, int64_t* h) {
    kn::abs_delta_histogram(mp, bp, s, e, h);
  });
  if (nonfinite != nullptr)
    for (uint32_t b = kn::kInfBits >> 16; b < kn::kHighBins; ++b) *nonfinite += high_bins[b];
  int64_t above_high = 0, above_low = 0;
  const int32_t high = kn::bin_of_kth_largest(high_bins.data(), kn::kHighBins, k, &above_high);
  const auto low_bins = histogram(n, kn::kLowBins, [&](int64_t s, int64_t e, int64_t* h) {
    kn::abs_delta_low_histogram(mp, bp, s, e, high, h);
  });
  const int32_t low = kn::bin_of_kth_largest(low_bins.data(), kn::kLowBins, k - above_high, &above_low);
  return (static_cast<uint32_t>(high) << 16) | static_cast<uint32_t>(low);
}

// The k-th largest key of every model, and its number of non-finite keys: small tensors from all
// their keys; larger ones by the sampled window (min(sample, n / 32) entries, one pass for all
// models), with the radix select for a model whose window missed; sample = 0: the radix select alone.
template <typename T>
void kth_largest_keys(const std::vector<const T*>& models, const T* base, int64_t n, int64_t k, int64_t sample,
                      uint32_t* result, int64_t* nonfinite) {
  const size_t num_models = models.size();
  if (n < kSelectAllBelow) {
    for (size_t m = 0; m < num_models; ++m) {
      // (a "sample" of n entries out of n is every key)
      std::vector<uint32_t> keys = sample_keys(std::vector<const T*>{models[m]}, base, n, n)[0];
      nonfinite[m] = std::count_if(keys.begin(), keys.end(), [](uint32_t key) { return key >= kn::kInfBits; });
      result[m] = nth_largest(keys, k - 1);
    }
    return;
  }
  std::vector<char> found(num_models, 0);  // (not vector<bool>: written from threads)
  sample = std::min(sample, n / kEntriesPerSample);
  const bool windowed = sample >= kMinSample;
  if (windowed) {
    auto samples = sample_keys(models, base, n, sample);
    std::vector<kn::SelectWindow> windows;
    for (auto& s : samples) windows.push_back(window_from_sample(s, n, k));
    // a window holds about 2 * margin / sample of the entries; collecting stops at 4x that
    const double q = static_cast<double>(k) / static_cast<double>(n), s = static_cast<double>(sample);
    const double expected = 2.0 * (kWindowSigmas * std::sqrt(s * q * (1.0 - q)) + 2.0) / s;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + kGrain - 1) / kGrain));
    const int64_t max_inside = static_cast<int64_t>(4.0 * expected * static_cast<double>(n) / parts) + kn::kBlock;
    std::vector<std::vector<kn::SelectPart>> by_part(parts, std::vector<kn::SelectPart>(num_models));
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        window_pass(models.data(), static_cast<int>(num_models), base, windows.data(), max_inside, by_part[p].data(),
                    n * p / parts, n * (p + 1) / parts);
    });
    at::parallel_for(0, static_cast<int64_t>(num_models), 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        std::vector<kn::SelectPart> of_model;
        for (auto& part : by_part) of_model.push_back(std::move(part[m]));
        nonfinite[m] = 0;
        for (const auto& part : of_model) nonfinite[m] += part.nonfinite;
        found[m] = select_in_window(windows[m], of_model, k, &result[m]);
      }
    });
  }
  for (size_t m = 0; m < num_models; ++m) {
    if (found[m]) continue;
    if (!windowed) nonfinite[m] = 0;
    result[m] = radix_select(models[m], base, n, k, windowed ? nullptr : &nonfinite[m]);
  }
}

std::tuple<at::Tensor, at::Tensor> abs_delta_kth_largest_cpu(at::TensorList models, const at::Tensor& base, int64_t k,
                                                             int64_t sample) {
  check_inputs("abs_delta_kth_largest", models, base);
  const int64_t n = base.numel();
  TORCH_CHECK(k >= 1 && k <= n, "abs_delta_kth_largest: k must be in [1, ", n, "], got ", k);
  TORCH_CHECK(sample >= 0, "abs_delta_kth_largest: sample must be >= 0, got ", sample);
  const std::vector<at::Tensor> m = contiguous(models);
  const at::Tensor b = base.contiguous();
  const int64_t num_models = static_cast<int64_t>(m.size());
  std::vector<uint32_t> keys(num_models);
  at::Tensor nonfinite = at::empty({num_models}, at::TensorOptions().dtype(at::kLong));
  FASTMERGE_DISPATCH_FUSED(b.scalar_type(), "abs_delta_kth_largest", [&] {
    std::vector<const scalar_t*> mp;
    for (const at::Tensor& t : m) mp.push_back(t.const_data_ptr<scalar_t>());
    kth_largest_keys(mp, b.const_data_ptr<scalar_t>(), n, k, sample, keys.data(), nonfinite.data_ptr<int64_t>());
  });
  at::Tensor thresholds = at::empty({num_models}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t i = 0; i < num_models; ++i) thresholds.data_ptr<float>()[i] = kn::float_from_bits(keys[i]);
  return {thresholds, nonfinite};
}

// Calls f(models, base, out, begin, end) with typed pointers over ranges of the entries, in
// parallel, for the input and output dtypes the ops take (float32, float16, bfloat16: the callers
// check them first, with the op's name in the message).
template <typename F>
void for_each_range(at::TensorList models, const at::Tensor& base, at::Tensor& out, const F& f) {
  const std::vector<at::Tensor> m = contiguous(models);
  const at::Tensor b = base.contiguous();
  FASTMERGE_DISPATCH_FUSED(b.scalar_type(), "same_init_merge", [&] {
    using in_t = scalar_t;
    std::vector<const in_t*> mp;
    for (const at::Tensor& t : m) mp.push_back(t.const_data_ptr<in_t>());
    const in_t* bp = b.const_data_ptr<in_t>();
    FASTMERGE_DISPATCH_FUSED(out.scalar_type(), "same_init_merge", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, b.numel(), kGrain, [&](int64_t begin, int64_t end) { f(mp, bp, op, begin, end); });
    });
  });
}

void ties_merge_out_cpu(at::TensorList models, const at::Tensor& base, at::ArrayRef<double> weights,
                        at::ArrayRef<double> thresholds, double scale, bool normalize, at::Tensor& out) {
  check_inputs("ties_merge_out", models, base);
  check_out("ties_merge_out", base, out);
  TORCH_CHECK(weights.size() == models.size() && thresholds.size() == models.size(), "ties_merge_out: got ",
              models.size(), " models, ", weights.size(), " weights and ", thresholds.size(), " thresholds");
  const std::vector<float> w(weights.begin(), weights.end()), thr(thresholds.begin(), thresholds.end());
  for_each_range(models, base, out, [&](const auto& mp, auto bp, auto op, int64_t s, int64_t e) {
    ties_merge(mp.data(), static_cast<int>(mp.size()), bp, w.data(), thr.data(), static_cast<float>(scale), normalize,
               op, s, e);
  });
}

void dare_merge_out_cpu(at::TensorList models, const at::Tensor& base, at::ArrayRef<double> coefficients,
                        at::IntArrayRef seeds, int64_t keep_below, at::Tensor& out) {
  check_inputs("dare_merge_out", models, base);
  check_out("dare_merge_out", base, out);
  TORCH_CHECK(coefficients.size() == models.size() && seeds.size() == models.size(), "dare_merge_out: got ",
              models.size(), " models, ", coefficients.size(), " coefficients and ", seeds.size(), " seeds");
  TORCH_CHECK(keep_below >= 0 && keep_below <= kn::kDareDraws, "dare_merge_out: keep_below must be in [0, 2^24], got ",
              keep_below);
  const std::vector<float> c(coefficients.begin(), coefficients.end());
  const std::vector<uint64_t> sd(seeds.begin(), seeds.end());
  for_each_range(models, base, out, [&](const auto& mp, auto bp, auto op, int64_t s, int64_t e) {
    dare_merge(mp.data(), static_cast<int>(mp.size()), bp, c.data(), sd.data(), static_cast<uint32_t>(keep_below), op,
               s, e);
  });
}

void dare_draws_out_cpu(int64_t start, int64_t seed, at::Tensor& out) {
  TORCH_CHECK(start >= 0, "dare_draws_out: start must be >= 0, got ", start);
  TORCH_CHECK(out.scalar_type() == at::kInt && out.dim() == 1 && out.is_contiguous(),
              "dare_draws_out: out must be a contiguous 1-d int32 tensor");
  int32_t* draws = out.data_ptr<int32_t>();
  at::parallel_for(start, start + out.numel(), kGrain, [&](int64_t begin, int64_t stop) {
    dare_draws(static_cast<uint64_t>(seed), begin, stop, draws + (begin - start));
  });
}

constexpr int64_t kGramChunk = 1 << 16;

at::Tensor gram_cpu(at::TensorList models, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK(!models.empty() && models.size() <= static_cast<size_t>(kn::kGramMaxModels),
              "gram: takes 1 to ", kn::kGramMaxModels, " tensors, got ", models.size());
  const at::Tensor& first = base.has_value() ? *base : models[0];
  check_inputs("gram", models, first);
  const int k = static_cast<int>(models.size());
  const int64_t n = first.numel();
  const std::vector<at::Tensor> m = contiguous(models);
  const at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  // one partial matrix per chunk, summed in chunk order: the same bits for any number of threads
  const int64_t chunks = (n + kGramChunk - 1) / kGramChunk;
  std::vector<double> partial(static_cast<size_t>(chunks) * k * k, 0.0);
  FASTMERGE_DISPATCH_FUSED(first.scalar_type(), "gram", [&] {
    std::vector<const scalar_t*> mp;
    for (const at::Tensor& t : m) mp.push_back(t.const_data_ptr<scalar_t>());
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        gram_range(mp.data(), k, bp, c * kGramChunk, std::min(n, (c + 1) * kGramChunk), partial.data() + c * k * k);
    });
  });
  at::Tensor result = at::zeros({k, k}, at::TensorOptions().dtype(at::kDouble));
  double* out = result.data_ptr<double>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t e = 0; e < k * k; ++e) out[e] += partial[c * k * k + e];
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("dare_draws_out", &dare_draws_out_cpu);
  m.impl("abs_delta_kth_largest", &abs_delta_kth_largest_cpu);
  m.impl("ties_merge_out", &ties_merge_out_cpu);
  m.impl("dare_merge_out", &dare_merge_out_cpu);
}

}  // namespace fastmerge
