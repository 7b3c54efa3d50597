// CPU kernels of fastmerge::abs_delta_kth_largest, ties_merge_out and dare_merge_out: the fused
// same-initialisation merges of kernels/same_init.h, parallel over element ranges. Inputs are
// float32, float16 or bfloat16 (all of one dtype), the output any of these.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

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

// Sampled entries that predict the histogram bin of the k-th largest key, the most candidate bins
// the first pass also counts by their low bits, and the size from which predicting pays.
constexpr int64_t kSample = 1 << 14;
constexpr int32_t kMaxGuess = 4;
constexpr int64_t kGuessFrom = 1 << 20;

// The candidate bins [*guess, *guess + *num_guess) of the k-th largest key: those of the sample's
// keys four standard deviations of a sampled rank (binomial) either side of k's rank; none when
// they span more than kMaxGuess bins.
template <typename T>
void guess_bins(const T* mp, const T* bp, int64_t n, int64_t k, int32_t* guess, int32_t* num_guess) {
  std::vector<uint32_t> sample(kSample);
  for (int64_t j = 0; j < kSample; ++j) {
    const int64_t i = j * n / kSample;
    sample[j] = kn::abs_bits(static_cast<float>(mp[i]) - static_cast<float>(bp[i]));
  }
  const double s = static_cast<double>(kSample), q = static_cast<double>(k) / static_cast<double>(n);
  const double margin = 4.0 * std::sqrt(s * q * (1.0 - q)) + 2.0;
  const auto rank = [&](double r) { return std::min<int64_t>(kSample - 1, std::max<int64_t>(0, static_cast<int64_t>(r))); };
  const auto key_at = [&](int64_t r) {  // the (r+1)-th largest sampled key
    std::nth_element(sample.begin(), sample.begin() + r, sample.end(), std::greater<uint32_t>());
    return sample[r];
  };
  const int32_t top = static_cast<int32_t>(key_at(rank(q * s - margin)) >> 16);
  const int32_t bottom = static_cast<int32_t>(key_at(rank(q * s + margin)) >> 16);
  *guess = bottom;
  *num_guess = top - bottom < kMaxGuess ? top - bottom + 1 : 0;
}

at::Tensor abs_delta_kth_largest_cpu(const at::Tensor& model, const at::Tensor& base, int64_t k) {
  check_inputs("abs_delta_kth_largest", {model}, base);
  const int64_t n = base.numel();
  TORCH_CHECK(k >= 1 && k <= n, "abs_delta_kth_largest: k must be in [1, ", n, "], got ", k);
  const at::Tensor m = model.contiguous(), b = base.contiguous();
  uint32_t bits = 0;
  FASTMERGE_DISPATCH_FUSED(b.scalar_type(), "abs_delta_kth_largest", [&] {
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    int32_t guess = 0, num_guess = 0;
    if (n >= kGuessFrom) guess_bins(mp, bp, n, k, &guess, &num_guess);
    const auto bins = histogram(n, kn::kHighBins + num_guess * kn::kLowBins, [&](int64_t s, int64_t e, int64_t* h) {
      kn::abs_delta_histogram(mp, bp, s, e, h, guess, num_guess);
    });
    int64_t above_high = 0, above_low = 0;
    const int32_t high = kn::bin_of_kth_largest(bins.data(), kn::kHighBins, k, &above_high);
    std::vector<int64_t> second;
    const int64_t* low_bins = nullptr;
    if (high >= guess && high < guess + num_guess) {
      low_bins = bins.data() + kn::kHighBins + static_cast<int64_t>(high - guess) * kn::kLowBins;
    } else {  // the prediction missed (or none was made): read the inputs again
      second = histogram(n, kn::kLowBins, [&](int64_t s, int64_t e, int64_t* h) {
        kn::abs_delta_low_histogram(mp, bp, s, e, high, h);
      });
      low_bins = second.data();
    }
    const int32_t low = kn::bin_of_kth_largest(low_bins, kn::kLowBins, k - above_high, &above_low);
    bits = (static_cast<uint32_t>(high) << 16) | static_cast<uint32_t>(low);
  });
  at::Tensor result = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *result.data_ptr<float>() = kn::float_from_bits(bits);
  return result;
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
                        at::ArrayRef<double> thresholds, double scale, at::Tensor& out) {
  check_inputs("ties_merge_out", models, base);
  check_out("ties_merge_out", base, out);
  TORCH_CHECK(weights.size() == models.size() && thresholds.size() == models.size(), "ties_merge_out: got ",
              models.size(), " models, ", weights.size(), " weights and ", thresholds.size(), " thresholds");
  const std::vector<float> w(weights.begin(), weights.end()), thr(thresholds.begin(), thresholds.end());
  for_each_range(models, base, out, [&](const auto& mp, auto bp, auto op, int64_t s, int64_t e) {
    kn::ties_merge(mp.data(), static_cast<int>(mp.size()), bp, w.data(), thr.data(), static_cast<float>(scale), op,
                   s, e);
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
    kn::dare_merge(mp.data(), static_cast<int>(mp.size()), bp, c.data(), sd.data(), static_cast<uint32_t>(keep_below),
                   op, s, e);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) {
  m.impl("abs_delta_kth_largest", &abs_delta_kth_largest_cpu);
  m.impl("ties_merge_out", &ties_merge_out_cpu);
  m.impl("dare_merge_out", &dare_merge_out_cpu);
}

}  // namespace fastmerge
