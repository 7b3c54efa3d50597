// Batched index gathers on the GPU: every permutation job of a transform_axes round in one launch.
// Header-only, no torch headers.
//
// A job gathers along one axis of a contiguous tensor viewed as (outer, n, inner): output row
// (o, j) is input row (o, index[j]). Rows are copied in units of `unit` bytes (16 when the row size
// and the pointers allow it), and every thread copies one unit of one row of one job, found by a
// binary search over the jobs' first unit. Indices are checked where they are read: an index
// outside [0, n) records the job in `bad` (the host reads it once per round) and copies nothing.
#pragma once

#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace fastmerge {
namespace cuda_kernels {

struct GatherJobDevice {
  const char* src;
  char* dst;
  const int64_t* index;
  int64_t n, m;          // input and output size of the gathered axis
  int64_t row_bytes;     // bytes of one (o, j) row: prod(shape[axis+1:]) * element size
  int64_t unit;          // bytes copied per thread: 16, 8, 4, 2 or 1, dividing row_bytes and the pointers' alignment
  int64_t first_unit;    // prefix sum of the units of the jobs before this one
};

template <typename U>
__device__ __forceinline__ void copy_unit(const char* src, char* dst) {
  *reinterpret_cast<U*>(dst) = *reinterpret_cast<const U*>(src);
}

__global__ void gather_rows_kernel(const GatherJobDevice* jobs, int num_jobs, int64_t total_units, int* bad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < total_units; u += step) {
    int lo = 0, hi = num_jobs - 1;  // the last job whose first unit is <= u
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (jobs[mid].first_unit <= u)
        lo = mid;
      else
        hi = mid - 1;
    }
    const GatherJobDevice& job = jobs[lo];
    const int64_t per_row = job.row_bytes / job.unit;
    const int64_t local = u - job.first_unit;
    const int64_t row = local / per_row, k = local - row * per_row;
    const int64_t o = row / job.m, j = row - o * job.m;
    const int64_t source = job.index[j];
    if (source < 0 || source >= job.n) {
      atomicMax(bad, lo + 1);
      continue;
    }
    const char* from = job.src + (o * job.n + source) * job.row_bytes + k * job.unit;
    char* to = job.dst + row * job.row_bytes + k * job.unit;
    switch (job.unit) {
      case 16: copy_unit<uint4>(from, to); break;
      case 8: copy_unit<uint2>(from, to); break;
      case 4: copy_unit<uint32_t>(from, to); break;
      case 2: copy_unit<uint16_t>(from, to); break;
      default: *to = *from; break;
    }
  }
}

}  // namespace cuda_kernels
}  // namespace fastmerge
