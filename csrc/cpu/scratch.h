// Per-thread scratch memory kept between op calls.
//
// On the machines this runs on, the first touch of fresh memory costs a page fault per 4 KiB
// (about 50 ms for a 32 MB buffer), more than the arithmetic of a covariance chunk or of an easy
// assignment problem. Ops that need a large temporary therefore reuse one kept by the thread that
// called the op. Call this only outside parallel regions, so OpenMP workers never pin memory.
// Requests above kRetainBytes get a one-off buffer instead, so one huge call does not pin its
// memory; at most kRetainBytes per element type stay with a calling thread.
#pragma once

#include <cstddef>
#include <vector>

namespace fastmerge {

constexpr size_t kRetainBytes = size_t(256) << 20;

// Returns room for `elements` values of T: the calling thread's retained buffer, or `one_off`
// (resized) for large requests. Valid until the next call on this thread or until one_off dies.
template <typename T>
T* retained_scratch(size_t elements, std::vector<T>& one_off) {
  thread_local std::vector<T> retained;
  if (elements * sizeof(T) > kRetainBytes) {
    one_off.resize(elements);
    return one_off.data();
  }
  if (retained.size() < elements) retained.resize(elements);
  return retained.data();
}

}  // namespace fastmerge
