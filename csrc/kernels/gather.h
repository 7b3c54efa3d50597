// Gather along one axis of a contiguous tensor viewed as (outer, n, inner):
//   dst[o, i, :] = src[o, index[i], :]   for i in [0, m).
// Applies a permutation (or any re-indexing, e.g. ZipIt's unmerge) to an axis. Header-only, no torch
// headers; element type erased to its byte size so one kernel serves every dtype.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastmerge {
namespace kernels {

struct GatherJob {
  const char* src;
  char* dst;
  const int64_t* index;  // m entries in [0, n), validated by the caller
  int64_t outer, n, m;
  int64_t inner_bytes;   // inner * element size
};

namespace detail {
template <typename Word>
void gather_words(const GatherJob& job, int64_t row_begin, int64_t row_end) {
  // Fixed-size memcpy compiles to one load/store and stays correct for under-aligned words
  // (e.g. two float32 read as one 8-byte word).
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t o = r / job.m, i = r - o * job.m;
    std::memcpy(job.dst + r * sizeof(Word), job.src + (o * job.n + job.index[i]) * sizeof(Word), sizeof(Word));
  }
}
}  // namespace detail

// Copies output rows [row_begin, row_end) of the outer*m rows; rows of one word (inner == 1, the
// column permutation of a Linear weight) use a typed load instead of a memcpy call per element.
inline void gather_rows(const GatherJob& job, int64_t row_begin, int64_t row_end) {
  switch (job.inner_bytes) {
    case 2: return detail::gather_words<uint16_t>(job, row_begin, row_end);
    case 4: return detail::gather_words<uint32_t>(job, row_begin, row_end);
    case 8: return detail::gather_words<uint64_t>(job, row_begin, row_end);
    default: break;
  }
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t o = r / job.m, i = r - o * job.m;
    std::memcpy(job.dst + r * job.inner_bytes, job.src + (o * job.n + job.index[i]) * job.inner_bytes,
                static_cast<size_t>(job.inner_bytes));
  }
}

}  // namespace kernels
}  // namespace fastmerge
