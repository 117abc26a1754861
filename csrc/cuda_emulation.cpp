// Test harness, not part of fastzo._C: runs the CUDA pass kernel (cuda_pass_kernel.cuh) on the
// CPU, one emulated thread after another, so that its indexing is checked where no GPU is.
// The kernel's threads share nothing and never synchronise, so a sequential run is exact. Device
// math takes the host paths of noise_contract.h, with the Box-Muller polynomial steps fused as on
// the device, so the results equal backend "cpp"'s vector variants bit for bit.
//
// Built by tests/test_cpp_backend.py with a plain C++ compiler (no CUDA, no torch headers).

#include <stdint.h>

namespace {

struct uint4 {
  uint32_t x, y, z, w;
};

inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }

struct Dim3 {
  unsigned x;
};

Dim3 gridDim, blockDim, blockIdx, threadIdx;

}  // namespace

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define FASTZO_FUSED_POLY_STEPS 1  // __fmaf_rn on the device

#include "cuda_pass_kernel.cuh"

// fast_math: the fast-math kernels with the host's accurate sinf/cosf/sqrtf of the same
// reduced angle (the Triton interpreter's way); otherwise bit-identical to backend "cpp".
extern "C" int fastzo_emulate_pass(int64_t* table, int n_tensors, int storage, int gaussian,
                                   int update, int stochastic, int next, uint64_t seed,
                                   uint64_t next_seed, float a, float decay, float b, float a_next,
                                   int fast_math, int blocks, int threads) {
  using namespace fastzo::gpu;
  number_vectors(table, n_tensors, storage);
  const KernelFunction kernel = pick_kernel(storage, gaussian != 0, update != 0,
                                            update != 0 && stochastic != 0, update != 0 && next != 0,
                                            fast_math != 0);
  if (kernel == nullptr) return 1;
  const PassConstants constants{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                                static_cast<uint32_t>(next_seed),
                                static_cast<uint32_t>(next_seed >> 32), a, decay, b, a_next,
                                /*multiple=*/1};
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  for (int block = 0; block < blocks; ++block) {
    blockIdx.x = static_cast<unsigned>(block);
    for (int thread = 0; thread < threads; ++thread) {
      threadIdx.x = static_cast<unsigned>(thread);
      kernel(table, n_tensors, constants);
    }
  }
  return 0;
}

// Exact mode (16-bit storages): the table has six columns, the sixth the quantum's exponent.
extern "C" int fastzo_emulate_exact_pass(int64_t* table, int n_tensors, int storage, int gaussian,
                                         int update, int stochastic, int next, uint64_t seed,
                                         uint64_t next_seed, float a, float decay, float b,
                                         float a_next, int multiple, int blocks, int threads) {
  using namespace fastzo::gpu;
  number_vectors(table, n_tensors, storage, kExactTableColumns);
  const KernelFunction kernel = pick_exact_kernel(storage, gaussian != 0, update != 0,
                                                  update != 0 && stochastic != 0,
                                                  update != 0 && next != 0);
  if (kernel == nullptr) return 1;
  const PassConstants constants{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                                static_cast<uint32_t>(next_seed),
                                static_cast<uint32_t>(next_seed >> 32), a, decay, b, a_next,
                                multiple};
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  for (int block = 0; block < blocks; ++block) {
    blockIdx.x = static_cast<unsigned>(block);
    for (int thread = 0; thread < threads; ++thread) {
      threadIdx.x = static_cast<unsigned>(thread);
      kernel(table, n_tensors, constants);
    }
  }
  return 0;
}
