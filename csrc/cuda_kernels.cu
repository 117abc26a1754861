// Backend "cuda": host side of the CUDA passes. The kernel itself is in cuda_pass_kernel.cuh;
// Philox, Box-Muller and the roundings come from noise_contract.h, shared with the CPU kernels.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <vector>

#include "cuda_pass_kernel.cuh"
#include "kernels.h"

namespace fastzo {

namespace {

// Enough resident threads to cover memory latency; the grid-stride loop does the rest.
constexpr int kBlocksPerSm = 8;

int storage_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return gpu::kFloat32;
    case at::kBFloat16: return gpu::kBFloat16;
    case at::kHalf: return gpu::kFloat16;
    default: TORCH_CHECK(false, "fastzo: unsupported dtype ", dtype);
  }
}

}  // namespace

void cuda_pass(const PassRequest& request) {
  using namespace gpu;
  check_request(request, c10::DeviceType::CUDA);
  bump_versions(request);
  std::map<at::ScalarType, std::vector<size_t>> by_dtype;
  for (size_t i = 0; i < request.tensors.size(); ++i) {
    if (request.tensors[i].numel() > 0) by_dtype[request.tensors[i].scalar_type()].push_back(i);
  }
  if (by_dtype.empty()) return;
  const at::Device device = request.tensors[by_dtype.begin()->second.front()].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()));
  const PassConstants constants{
      static_cast<uint32_t>(request.seed),      static_cast<uint32_t>(request.seed >> 32),
      static_cast<uint32_t>(request.next_seed), static_cast<uint32_t>(request.next_seed >> 32),
      request.a, request.decay, request.b, request.a_next, request.multiple};

  for (const auto& [dtype, indices] : by_dtype) {
    const int storage = storage_code(dtype);
    const int n_tensors = static_cast<int>(indices.size());
    const int columns = request.exact ? kExactTableColumns : kTableColumns;
    at::Tensor table = at::empty({n_tensors, columns},
                                 at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* row = table.data_ptr<int64_t>();
    for (size_t i : indices) {
      const at::Tensor& t = request.tensors[i];
      row[0] = reinterpret_cast<int64_t>(t.data_ptr());
      row[1] = t.numel();
      row[2] = request.keys[i];
      row[3] = request.offsets[i];
      if (request.exact) row[5] = request.exponents[i];
      row += columns;
    }
    const int64_t total_vectors =
        number_vectors(table.data_ptr<int64_t>(), n_tensors, storage, columns);
    // A pinned source copied on the launch stream: the table is on the device before the kernel
    // runs, and the caching allocator keeps it alive until then.
    const at::Tensor device_table = table.to(device, /*non_blocking=*/true);
    const int64_t wanted = (total_vectors + kThreads - 1) / kThreads;
    const int blocks = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(wanted, static_cast<int64_t>(sm_count) * kBlocksPerSm)));
    const KernelFunction kernel =
        request.exact
            ? pick_exact_kernel(storage, request.gaussian, request.update,
                                request.update && request.stochastic,
                                request.update && request.has_next)
            : pick_kernel(storage, request.gaussian, request.update,
                          request.update && request.stochastic, request.update && request.has_next,
                          request.fast_math);
    TORCH_CHECK(kernel != nullptr, "fastzo: no kernel for dtype ", dtype);
    kernel<<<blocks, kThreads, 0, stream>>>(device_table.data_ptr<int64_t>(), n_tensors, constants);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fastzo
