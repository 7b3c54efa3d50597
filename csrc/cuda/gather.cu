// Launcher of the batched CUDA gather (csrc/kernels/cuda/gather.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda/device_types.h"
#include "cuda/gather.h"
#include "kernels/cuda/gather.cuh"

namespace fastmerge {

namespace ck = cuda_kernels;

int64_t gather_rows_cuda(const std::vector<DeviceGather>& jobs) {
  if (jobs.empty()) return -1;
  const c10::cuda::CUDAGuard guard(jobs[0].src.device());
  std::vector<ck::GatherJobDevice> table;
  std::vector<int64_t> position;  // table entry -> job
  int64_t total = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const DeviceGather& job = jobs[i];
    const int64_t rows = job.outer * job.m;
    if (rows == 0 || job.row_bytes == 0) continue;
    const auto src = reinterpret_cast<uintptr_t>(job.src.const_data_ptr());
    const auto dst = reinterpret_cast<uintptr_t>(job.dst.data_ptr());
    int64_t unit = 16;
    while (unit > 1 && (job.row_bytes % unit != 0 || src % unit != 0 || dst % unit != 0)) unit /= 2;
    table.push_back({static_cast<const char*>(job.src.const_data_ptr()), static_cast<char*>(job.dst.data_ptr()),
                     job.index.const_data_ptr<int64_t>(), job.n, job.m, job.row_bytes, unit, total});
    position.push_back(static_cast<int64_t>(i));
    total += rows * (job.row_bytes / unit);
  }
  if (table.empty()) return -1;
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(ck::GatherJobDevice));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), table.data(), static_cast<size_t>(bytes));
  const at::Tensor device_table = host.to(jobs[0].src.device());
  at::Tensor bad = at::zeros({1}, jobs[0].src.options().dtype(at::kInt));
  ck::gather_rows_kernel<<<grid_for(total, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const ck::GatherJobDevice*>(device_table.const_data_ptr()), static_cast<int>(table.size()), total,
      bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int flagged = bad.item<int>();
  return flagged == 0 ? -1 : position[flagged - 1];
}

}  // namespace fastmerge
