// CPU kernel of fastmerge::transform_axes: per-axis transforms applied to a list of tensors in one
// call, returning new tensors (inputs are never written).
//
// Job q transforms axis axis[q] of tensors[tensor_index[q]] by transforms[q]:
//   1-D integer index (m,)       out[.., i, ..] = W[.., index[i], ..]         (permutation / gather)
//   2-D float (m, n)             out[.., i, ..] = sum_j M[i, j] W[.., j, ..]   (dense, n = size(axis))
//   3-D float (h, mh, nh)        block-diagonal: h blocks of (mh, nh), size(axis) = h * nh, e.g.
//                                one dense transform per attention head.
// Several jobs on one tensor apply in list order. A CPU tensor with gathers only is copied once (its
// gathers composed per axis, run_fused_gathers). Otherwise jobs of one round (the r-th job of every
// tensor) run together: all gathers in one parallel loop, dense jobs of equal shapes in one batched GEMM.
//
// The same function serves CUDA tensors (registered below when built with CUDA): the dense jobs are
// ATen products either way, and a round's gathers run in one CUDA launch that also checks every
// index (one synchronisation per round).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include "kernels/gather.h"
#if FASTMERGE_WITH_CUDA
#include "cuda/gather.h"
#endif

namespace fastmerge {
namespace {

struct Job {
  int64_t tensor;
  int64_t axis;
  at::Tensor transform;  // validated: int64 index, or floating 2-D / 3-D
};

int64_t normalise_axis(int64_t axis, int64_t dim, int64_t job) {
  TORCH_CHECK_INDEX(dim > 0 && axis >= -dim && axis < dim, "transform_axes: job ", job, " names axis ", axis,
                    " of a tensor with ", dim, " dims");
  return axis < 0 ? axis + dim : axis;
}

// Size of the transformed axis after the job, validating the transform against the current size.
int64_t output_size(const Job& job, int64_t n, int64_t q) {
  const at::Tensor& m = job.transform;
  if (m.dim() == 1) return m.size(0);
  if (m.dim() == 2) {
    TORCH_CHECK(m.size(1) == n, "transform_axes: job ", q, ": matrix of shape ", m.sizes(), " cannot act on axis ",
                job.axis, " of size ", n, " (needs ", n, " columns)");
    return m.size(0);
  }
  TORCH_CHECK(m.size(0) * m.size(2) == n, "transform_axes: job ", q, ": block-diagonal transform of shape ",
              m.sizes(), " cannot act on axis ", job.axis, " of size ", n, " (needs blocks * block_cols == ", n, ")");
  return m.size(0) * m.size(1);
}

Job make_job(at::TensorList tensors, const at::Tensor& transform, int64_t tensor, int64_t axis, int64_t q) {
  TORCH_CHECK_INDEX(tensor >= 0 && tensor < static_cast<int64_t>(tensors.size()), "transform_axes: job ", q,
                    " names tensor ", tensor, " but only ", tensors.size(), " were given");
  Job job{tensor, normalise_axis(axis, tensors[tensor].dim(), q), transform};
  if (at::isIntegralType(transform.scalar_type(), /*includeBool=*/false)) {
    TORCH_CHECK(transform.dim() == 1, "transform_axes: job ", q, ": an index transform must be 1-D, got shape ",
                transform.sizes());
    job.transform = transform.to(tensors[tensor].device(), at::kLong).contiguous();
  } else {
    TORCH_CHECK(at::isFloatingType(transform.scalar_type()) && (transform.dim() == 2 || transform.dim() == 3),
                "transform_axes: job ", q, ": a transform must be an integer index (m,), a float matrix (m, n) or ",
                "float blocks (h, m, n); got ", transform.scalar_type(), " of shape ", transform.sizes());
    TORCH_CHECK(at::isFloatingType(tensors[tensor].scalar_type()), "transform_axes: job ", q,
                ": a dense transform needs a floating-point tensor, tensor ", tensor, " is ",
                tensors[tensor].scalar_type());
    job.transform = transform.to(tensors[tensor].device());
  }
  return job;
}

void check_index_range(const at::Tensor& index, int64_t n, int64_t q) {
  const int64_t* p = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < n, "transform_axes: job ", q, ": index ", p[i], " at position ", i,
                      " is outside the axis of size ", n);
}

std::vector<int64_t> shape_with(at::IntArrayRef shape, int64_t axis, int64_t size) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out[axis] = size;
  return out;
}

int64_t prod(at::IntArrayRef shape, int64_t begin, int64_t end) {
  int64_t p = 1;
  for (int64_t d = begin; d < end; ++d) p *= shape[d];
  return p;
}

// The rows of many jobs in one parallel loop: job w owns rows [row_start[w], row_start[w + 1]) of the
// whole range; rows(w, begin, end) runs job w's rows [begin, end), counted from the job's first.
template <typename Rows>
void parallel_over_rows(const std::vector<int64_t>& row_start, int64_t grain, const Rows& rows) {
  at::parallel_for(0, row_start.back(), grain, [&](int64_t begin, int64_t end) {
    size_t w = std::upper_bound(row_start.begin(), row_start.end(), begin) - row_start.begin() - 1;
    for (int64_t r = begin; r < end;) {
      while (row_start[w + 1] <= r) ++w;
      const int64_t stop = std::min(end, row_start[w + 1]);
      rows(w, r - row_start[w], stop - row_start[w]);
      r = stop;
    }
  });
}

// Gathers of one round on a GPU: one launch for all of them, indices checked by the kernel.
void run_gathers_device(std::vector<at::Tensor>& current, const std::vector<std::pair<Job, int64_t>>& jobs) {
#if FASTMERGE_WITH_CUDA
  std::vector<DeviceGather> work;
  for (const auto& [job, q] : jobs) {
    const at::Tensor src = current[job.tensor].contiguous();
    const int64_t m = job.transform.size(0);
    at::Tensor dst = at::empty(shape_with(src.sizes(), job.axis, m), src.options());
    work.push_back({src, dst, job.transform, prod(src.sizes(), 0, job.axis), src.size(job.axis), m,
                    prod(src.sizes(), job.axis + 1, src.dim()) * static_cast<int64_t>(src.element_size())});
  }
  const int64_t bad = gather_rows_cuda(work);
  if (bad >= 0) check_index_range(jobs[bad].first.transform.cpu(), work[bad].n, jobs[bad].second);
  for (size_t i = 0; i < jobs.size(); ++i) current[jobs[i].first.tensor] = work[i].dst;
#else
  TORCH_CHECK(false, "transform_axes: tensors on ", current[jobs.front().first.tensor].device(),
              " but this build of fastmerge has no CUDA kernels");
#endif
}

// All gathers of one round in a single parallel loop over output rows.
void run_gathers(std::vector<at::Tensor>& current, const std::vector<std::pair<Job, int64_t>>& jobs) {
  if (jobs.empty()) return;
  if (!current[jobs.front().first.tensor].is_cpu()) return run_gathers_device(current, jobs);
  std::vector<kernels::GatherJob> work;
  std::vector<at::Tensor> outputs;
  std::vector<int64_t> row_start{0};
  for (const auto& [job, q] : jobs) {
    const at::Tensor src = current[job.tensor].contiguous();
    const int64_t n = src.size(job.axis);
    check_index_range(job.transform, n, q);
    const int64_t m = job.transform.size(0);
    at::Tensor dst = at::empty(shape_with(src.sizes(), job.axis, m), src.options());
    const int64_t outer = prod(src.sizes(), 0, job.axis);
    const int64_t inner = prod(src.sizes(), job.axis + 1, src.dim());
    work.push_back({static_cast<const char*>(src.const_data_ptr()), static_cast<char*>(dst.data_ptr()),
                    job.transform.const_data_ptr<int64_t>(), outer, n, m,
                    inner * static_cast<int64_t>(src.element_size())});
    row_start.push_back(row_start.back() + outer * m);
    outputs.push_back(dst);
    current[job.tensor] = src;  // keep the contiguous source alive until the loop ends
  }
  parallel_over_rows(row_start, 4096, [&](size_t w, int64_t begin, int64_t end) { kernels::gather_rows(work[w], begin, end); });
  for (size_t i = 0; i < jobs.size(); ++i) current[jobs[i].first.tensor] = outputs[i];
}

// A contiguous tensor with storage of its own: a slice of a batched result would otherwise keep the
// whole batch alive (and share memory with its siblings, which serialisers reject).
at::Tensor own_storage(const at::Tensor& t, const at::Tensor& batch_result) {
  if (t.is_alias_of(batch_result)) return t.clone(at::MemoryFormat::Contiguous);
  return t.contiguous();
}

// Dense jobs of one round, batched by equal (shape, axis, transform shape, dtypes).
void run_dense(std::vector<at::Tensor>& current, const std::vector<std::pair<Job, int64_t>>& jobs) {
  using Key = std::tuple<std::vector<int64_t>, int64_t, std::vector<int64_t>, int, int>;
  std::map<Key, std::vector<const Job*>> groups;
  for (const auto& [job, q] : jobs) {
    const at::Tensor& w = current[job.tensor];
    output_size(job, w.size(job.axis), q);  // validates the transform's shape against the axis
    const at::Tensor& m = job.transform;
    Key key{w.sizes().vec(), job.axis, m.sizes().vec(), static_cast<int>(w.scalar_type()),
            static_cast<int>(m.scalar_type())};
    groups[key].push_back(&job);
  }
  for (auto& [key, members] : groups) {
    const at::Tensor& first = current[members.front()->tensor];
    const at::Tensor& first_m = members.front()->transform;
    const int64_t axis = members.front()->axis;
    // Half/bfloat16 weights are transformed in float32; float64 transforms keep float64.
    const at::ScalarType compute =
        c10::promoteTypes(c10::promoteTypes(first.scalar_type(), first_m.scalar_type()), at::kFloat);
    const int64_t blocks = first_m.dim() == 3 ? first_m.size(0) : 1;
    const int64_t rows_out = first_m.size(-2), cols_in = first_m.size(-1);
    const bool last_axis = axis == first.dim() - 1 && blocks == 1;
    const int64_t g = static_cast<int64_t>(members.size());
    const int64_t others = prod(first.sizes(), 0, axis) * prod(first.sizes(), axis + 1, first.dim());

    std::vector<at::Tensor> ws, ms;
    for (const Job* job : members) {
      const at::Tensor w = current[job->tensor].to(compute);
      // last axis: (outer, n) @ M^T needs no copy; otherwise the axis goes first: (h, nh, rest).
      ws.push_back(last_axis ? w.reshape({others, cols_in}) : w.movedim(axis, 0).reshape({blocks, cols_in, others}));
      ms.push_back(job->transform.to(compute).reshape({blocks, rows_out, cols_in}));
    }
    at::Tensor w_all = g == 1 ? ws[0].unsqueeze(0) : at::stack(ws);
    at::Tensor m_all = g == 1 ? ms[0].unsqueeze(0) : at::stack(ms);
    if (last_axis) {
      at::Tensor result = at::bmm(w_all, m_all.squeeze(1).transpose(1, 2));  // (g, outer, m)
      for (int64_t i = 0; i < g; ++i) {
        const at::Tensor& w = current[members[i]->tensor];
        current[members[i]->tensor] =
            own_storage(result[i].reshape(shape_with(w.sizes(), axis, rows_out)).to(w.scalar_type()), result);
      }
    } else {
      at::Tensor result = at::bmm(m_all.reshape({g * blocks, rows_out, cols_in}),
                                  w_all.reshape({g * blocks, cols_in, others}));  // (g*h, mh, rest)
      result = result.reshape({g, blocks * rows_out, others});
      for (int64_t i = 0; i < g; ++i) {
        const at::Tensor& w = current[members[i]->tensor];
        std::vector<int64_t> moved = shape_with(w.sizes(), axis, blocks * rows_out);
        std::rotate(moved.begin(), moved.begin() + axis, moved.begin() + axis + 1);  // axis first
        current[members[i]->tensor] =
            own_storage(result[i].reshape(moved).movedim(0, axis).to(w.scalar_type()), result);
      }
    }
  }
}

// CPU tensors whose jobs are all index gathers: each tensor's gathers composed per axis (a later
// gather on an axis re-indexes the earlier one's index, checked against the size it meets) and run
// as one multi-axis gather: one copy of a weight whose rows and columns are both permuted, where a
// round per job copies it once per job. All such tensors in one parallel loop over output rows.
// Marks the tensors it transformed in `done`.
void run_fused_gathers(at::TensorList tensors, const std::vector<std::vector<std::pair<Job, int64_t>>>& per_tensor,
                       std::vector<at::Tensor>& current, std::vector<bool>& done) {
  std::vector<kernels::MultiGatherJob> work;
  std::vector<at::Tensor> keep;  // sources and composed indices, alive until the loop ends
  std::vector<int64_t> row_start{0};
  int64_t longest_row = 1;
  for (size_t t = 0; t < per_tensor.size(); ++t) {
    const auto& jobs = per_tensor[t];
    const at::Tensor& w = tensors[t];
    const int64_t bytes = static_cast<int64_t>(w.element_size());
    if (jobs.empty() || !w.is_cpu() || w.dim() == 0 || !(bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8)) continue;
    if (!std::all_of(jobs.begin(), jobs.end(), [](const auto& j) { return j.first.transform.dim() == 1; })) continue;
    std::vector<at::Tensor> index(static_cast<size_t>(w.dim()));
    std::vector<int64_t> sizes = w.sizes().vec();
    for (const auto& [job, q] : jobs) {
      check_index_range(job.transform, sizes[job.axis], q);
      at::Tensor& axis_index = index[job.axis];
      axis_index = axis_index.defined() ? axis_index.index_select(0, job.transform) : job.transform;
      sizes[job.axis] = job.transform.size(0);
    }
    const at::Tensor src = w.contiguous();
    at::Tensor dst = at::empty(sizes, w.options());
    kernels::MultiGatherJob g{static_cast<const char*>(src.const_data_ptr()), static_cast<char*>(dst.data_ptr()),
                              bytes, sizes, src.strides().vec(), {}};
    for (at::Tensor& i : index) {
      if (i.defined()) i = i.contiguous();
      g.index.push_back(i.defined() ? i.const_data_ptr<int64_t>() : nullptr);
      keep.push_back(i);
    }
    keep.push_back(src);
    row_start.push_back(row_start.back() + g.rows());
    longest_row = std::max(longest_row, sizes.back());
    work.push_back(std::move(g));
    current[t] = dst;
    done[t] = true;
  }
  if (work.empty()) return;
  parallel_over_rows(row_start, std::max<int64_t>(1, (int64_t{1} << 14) / longest_row),
                     [&](size_t w, int64_t begin, int64_t end) { kernels::multi_gather_rows(work[w], begin, end); });
}

std::vector<at::Tensor> transform_axes_any(at::TensorList tensors, at::TensorList transforms,
                                           at::IntArrayRef tensor_index, at::IntArrayRef axis) {
  const size_t num_jobs = transforms.size();
  TORCH_CHECK(tensor_index.size() == num_jobs && axis.size() == num_jobs,
              "transform_axes: transforms, tensor_index and axis must have the same length, got ", num_jobs, ", ",
              tensor_index.size(), " and ", axis.size());
  // Per tensor, its jobs in order, each with its position in the call (for error messages).
  std::vector<std::vector<std::pair<Job, int64_t>>> per_tensor(tensors.size());
  for (size_t q = 0; q < num_jobs; ++q) {
    Job job = make_job(tensors, transforms[q], tensor_index[q], axis[q], static_cast<int64_t>(q));
    per_tensor[job.tensor].emplace_back(job, static_cast<int64_t>(q));
  }
  std::vector<at::Tensor> current(tensors.begin(), tensors.end());
  std::vector<bool> done(tensors.size(), false);
  run_fused_gathers(tensors, per_tensor, current, done);
  size_t rounds = 0;
  for (size_t t = 0; t < per_tensor.size(); ++t)
    if (!done[t]) rounds = std::max(rounds, per_tensor[t].size());
  for (size_t r = 0; r < rounds; ++r) {
    std::vector<std::pair<Job, int64_t>> gathers, dense;
    for (size_t t = 0; t < per_tensor.size(); ++t) {
      if (done[t] || r >= per_tensor[t].size()) continue;
      const auto& entry = per_tensor[t][r];
      (entry.first.transform.dim() == 1 ? gathers : dense).push_back(entry);
    }
    run_gathers(current, gathers);
    run_dense(current, dense);
  }
  // Outputs never alias inputs, also for tensors no job touched.
  for (size_t t = 0; t < tensors.size(); ++t)
    if (per_tensor[t].empty()) current[t] = tensors[t].clone(at::MemoryFormat::Contiguous);
  return current;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmerge, CPU, m) { m.impl("transform_axes", &transform_axes_any); }
#if FASTMERGE_WITH_CUDA
TORCH_LIBRARY_IMPL(fastmerge, CUDA, m) { m.impl("transform_axes", &transform_axes_any); }
#endif

}  // namespace fastmerge
