// Batched index gathers on CUDA tensors (csrc/kernels/cuda/gather.cuh), called by transform_axes.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fastmerge {

// dst (outer, m, inner) <- src (outer, n, inner) rows index[j]; src and dst contiguous.
struct DeviceGather {
  at::Tensor src, dst, index;
  int64_t outer, n, m, row_bytes;
};

// Runs every gather in one launch and returns -1 when all indices were inside their axes, else the
// position of a job with an index outside (its output is then unspecified). One synchronisation.
int64_t gather_rows_cuda(const std::vector<DeviceGather>& jobs);

}  // namespace fastmerge
