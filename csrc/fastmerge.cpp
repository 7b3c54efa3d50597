// Every op schema of the fastmerge library. Kernels live in cpu/ (and cuda/), registered per
// dispatch key, so the dispatcher picks the backend from the tensors' device.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace fastmerge {
namespace {

// Facts fixed when the library was compiled, as key=value lines, for `fastmerge info`.
std::string build_info() {
  std::string info;
  info += "torch_compiled=" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
          std::to_string(TORCH_VERSION_PATCH) + "\n";
  info += std::string("cuda=") + (FASTMERGE_WITH_CUDA ? "1" : "0") + "\n";
#ifdef _OPENMP
  info += "openmp=" + std::to_string(_OPENMP) + "\n";
#else
  info += "openmp=0\n";
#endif
#ifdef __VERSION__
  info += std::string("compiler=") + __VERSION__ + "\n";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(fastmerge, m) {
  m.def("build_info() -> str", &build_info);
  // Streaming covariance: fold one batch of k feature blocks (each (B, C_b)) into the float64 state:
  // count (one element), mean[b] (C_b), m2[p] (C_l, C_r) for the kept pairs p = (pair_left[p], pair_right[p]).
  m.def(
      "cov_update_(Tensor(a!) count, Tensor(b!)[] mean, Tensor(c!)[] m2, Tensor[] features, int[] pair_left, "
      "int[] pair_right) -> ()");
  // Per-axis transforms (index gather, dense matrix, block-diagonal matrices) on many tensors.
  m.def("transform_axes(Tensor[] tensors, Tensor[] transforms, int[] tensor_index, int[] axis) -> Tensor[]");
  // out_t = sum_j c_tj * tensors[t * num_models + j]; c from coefficients (one per tensor) or weights.
  m.def("combine(Tensor[] tensors, Tensor[] coefficients, float[] weights, int num_models) -> Tensor[]");
  // The same into preallocated outputs (reused buffers skip the page faults of fresh memory).
  m.def(
      "combine_out(Tensor[] tensors, Tensor[] coefficients, float[] weights, int num_models, Tensor(a!)[] out) -> "
      "()");
  m.def(
      "combine_backward(Tensor[] grad_outputs, Tensor[] tensors, Tensor[] coefficients, int num_models) -> "
      "Tensor[]");
  // Two-parent NP Merge: out_t = sigmoid(l_t) a_t + (1 - sigmoid(l_t)) b_t, logits broadcast like combine's
  // coefficients; the backward gives the logit gradients without weight-sized intermediates.
  m.def("sigmoid_merge(Tensor[] a, Tensor[] b, Tensor[] logits) -> Tensor[]");
  m.def("sigmoid_merge_backward(Tensor[] grad_outputs, Tensor[] a, Tensor[] b, Tensor[] logits) -> Tensor[]");
  // Exact linear assignment of a (n, m) cost matrix or a batch (b, n, m); returns (row_ind, col_ind)
  // of length min(n, m) each, rows ascending, as scipy.optimize.linear_sum_assignment.
  m.def("linear_assignment(Tensor cost, bool maximize=False) -> (Tensor, Tensor)");
  // NaN/Inf entries of each tensor (int64 counts, one per tensor): the input guard of every merge.
  m.def("count_nonfinite(Tensor[] tensors) -> Tensor");
  // Same-initialisation merges fused per element (kernels/same_init.h). The k-th largest
  // |models[i] - base| of every model (float32, exact): TIES' trimming thresholds; and how many of
  // them are NaN/Inf (int64: the model or the base is not finite there), so TIES needs no separate
  // pass to check its inputs. `sample`: the most entries sampled (at most 1 in 32) to narrow the
  // select to one pass (0: a radix select, more passes; same result).
  m.def("abs_delta_kth_largest(Tensor[] models, Tensor base, int k, int sample=65536) -> (Tensor, Tensor)");
  // G[i][j] = <models[i] - base, models[j] - base> (without a base: <models[i], models[j]>) in
  // float64, one pass over the inputs (kernels/gram.h): Model Stock's and the SLERP family's angles.
  m.def("gram(Tensor[] models, Tensor? base) -> Tensor");
  // DARE's 24-bit draws (int32) of entries [start, start + out.numel()) for `seed`: dare_merge_out's.
  m.def("dare_draws_out(int start, int seed, Tensor(a!) out) -> ()");
  // DELLA's keep mask (kernels/magprune.h): along each row of `rows`, keep[i] = DARE draw(seed, flat i) / 2^24 <
  // density - epsilon + 2 epsilon * (stable rank of |rows[i]| in its row) / (row length - 1).
  m.def("magprune_keep_out(Tensor rows, float density, float epsilon, int seed, Tensor(a!) keep) -> ()");
  // (rows, len(positions)): the |value| of ascending rank positions[j] in each row of `rows` (a radix
  // sort of the magnitudes' bits per row, kernels/row_sort.h): weight matching's signature quantiles.
  m.def("magnitude_order_statistics(Tensor rows, int[] positions) -> Tensor");
  // The same and each row's sum of squares in float64 (fixed order) from the same pass: weight
  // matching's signature quantiles and their scale.
  m.def("magnitude_signature(Tensor rows, int[] positions) -> (Tensor, Tensor)");
  // total = ((total + parts[0]) + parts[1]) + ... in float64, each float32/float64 part widened exactly
  // (kernels/accumulate.h), one pass; `fresh`: the total starts at zero. Weight matching's cost sums.
  m.def("accumulate_float64_(Tensor(a!) total, Tensor[] parts, bool fresh) -> ()");
  // TIES: out = base + scale * (w-weighted mean of the trimmed task vectors that agree with the elected sign).
  m.def(
      "ties_merge_out(Tensor[] models, Tensor base, float[] weights, float[] thresholds, float scale, bool normalize, "
      "Tensor(a!) out) "
      "-> ()");
  // DARE: out = base + sum_k coefficients[k] * keep_k * (models[k] - base), keep_k = hash draw(seeds[k], i) < keep_below.
  m.def(
      "dare_merge_out(Tensor[] models, Tensor base, float[] coefficients, int[] seeds, int keep_below, Tensor(a!) out) "
      "-> ()");
}

}  // namespace fastmerge
