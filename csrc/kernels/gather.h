// Gather along one axis of a contiguous tensor viewed as (outer, n, inner):
//   dst[o, i, :] = src[o, index[i], :]   for i in [0, m).
// Applies a permutation (or any re-indexing, e.g. ZipIt's unmerge) to an axis. Header-only, no torch
// headers; element type erased to its byte size so one kernel serves every dtype.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace fastmerge {
namespace kernels {

struct GatherJob {
  const char* src;
  char* dst;
  const int64_t* index;  // m entries in [0, n), validated by the caller
  int64_t outer, n, m;
  int64_t inner_bytes;   // inner * element size
};

// Calls word(W{}) with W the unsigned integer of `bytes` bytes (1, 2, 4 or 8) and returns true;
// false for any other width. The kernels below copy elements as such words, whatever their dtype.
template <typename Word>
inline bool with_word(int64_t bytes, const Word& word) {
  switch (bytes) {
    case 1: word(uint8_t{}); return true;
    case 2: word(uint16_t{}); return true;
    case 4: word(uint32_t{}); return true;
    case 8: word(uint64_t{}); return true;
    default: return false;
  }
}

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
  if (with_word(job.inner_bytes, [&](auto w) { detail::gather_words<decltype(w)>(job, row_begin, row_end); })) return;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t o = r / job.m, i = r - o * job.m;
    std::memcpy(job.dst + r * job.inner_bytes, job.src + (o * job.n + job.index[i]) * job.inner_bytes,
                static_cast<size_t>(job.inner_bytes));
  }
}

// Gather along every axis at once: dst[i0, .., ik] = src[idx0[i0], .., idxk[ik]] (an axis without
// an index keeps its positions). One pass for a weight whose rows and columns are both permuted,
// where a gather per axis copies it once per axis. Iterated by output rows (every axis but the last).
struct MultiGatherJob {
  const char* src;
  char* dst;
  int64_t element_bytes;
  std::vector<int64_t> out_sizes;       // per axis (the source's size where there is no index)
  std::vector<int64_t> src_strides;     // per axis, in elements, of the contiguous source
  std::vector<const int64_t*> index;    // per axis, nullptr: identity; entries validated by the caller

  int64_t rows() const {
    int64_t r = 1;
    for (size_t d = 0; d + 1 < out_sizes.size(); ++d) r *= out_sizes[d];
    return r;
  }
};

namespace detail {
template <typename Word>
void multi_gather_words(const MultiGatherJob& job, int64_t row_begin, int64_t row_end) {
  const int last_axis = static_cast<int>(job.out_sizes.size()) - 1;
  const int64_t length = job.out_sizes[last_axis];
  const int64_t* last = job.index[last_axis];
  for (int64_t r = row_begin; r < row_end; ++r) {
    int64_t rest = r, offset = 0;
    for (int d = last_axis - 1; d >= 0; --d) {
      const int64_t i = rest % job.out_sizes[d];
      rest /= job.out_sizes[d];
      offset += (job.index[d] != nullptr ? job.index[d][i] : i) * job.src_strides[d];
    }
    const char* in = job.src + offset * static_cast<int64_t>(sizeof(Word));
    char* out = job.dst + r * length * static_cast<int64_t>(sizeof(Word));
    if (last == nullptr) {
      std::memcpy(out, in, static_cast<size_t>(length) * sizeof(Word));
      continue;
    }
    for (int64_t k = 0; k < length; ++k)
      std::memcpy(out + k * static_cast<int64_t>(sizeof(Word)), in + last[k] * static_cast<int64_t>(sizeof(Word)),
                  sizeof(Word));
  }
}
}  // namespace detail

// Output rows [row_begin, row_end) of job.rows(); element_bytes is 1, 2, 4 or 8 (checked by the caller).
inline void multi_gather_rows(const MultiGatherJob& job, int64_t row_begin, int64_t row_end) {
  with_word(job.element_bytes, [&](auto w) { detail::multi_gather_words<decltype(w)>(job, row_begin, row_end); });
}

}  // namespace kernels
}  // namespace fastmerge
