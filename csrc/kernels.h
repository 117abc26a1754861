// Entry points of fastzo._C, shared by the bindings and the CPU/CUDA kernel files.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastzo {

// Arguments as backends/__init__.py describes them: contiguous float32/bfloat16/float16 tensors
// on one device, one key (uint32) and one global offset per tensor, a uint64 seed, float32
// constants (passed as doubles that are exact float32 values).
struct PassRequest {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> keys;
  std::vector<int64_t> offsets;
  uint64_t seed = 0;
  bool gaussian = true;
  bool update = false;  // false: perturb, theta + a*z; true: (theta + a*z)*decay - b*z
  bool stochastic = false;  // stochastic rounding of 16-bit stores (update only)
  float a = 0.f, decay = 1.f, b = 0.f;
  // Fused update: also + a_next * z(next_seed), one rounding for both.
  bool has_next = false;
  uint64_t next_seed = 0;
  float a_next = 0.f;
  // Exact mode (16-bit tensors only; docs/noise.md "Exact perturbation of 16-bit weights"):
  // integer steps k = rne(a/q z) on each tensor's grid, q = 2^exponents[i]. Perturb moves by
  // multiple*k; update restores by +k, updates, stores on the grid (then + k' with has_next).
  bool exact = false;
  int32_t multiple = 1;
  std::vector<int64_t> exponents;
  // CUDA only, Gaussian passes that are not exact: hardware sine, cosine and square root
  // (docs/noise.md, "Fast math"). The CPU passes are the contract's polynomials.
  bool fast_math = false;
};

// Checks everything before any tensor is touched; throws c10::Error on bad input.
void check_request(const PassRequest& request, c10::DeviceType device_type);

// Counts the coming in-place write in each tensor's version counter (after check_request).
void bump_versions(const PassRequest& request);

void cpu_pass(const PassRequest& request);

// How many threads did work in the latest cpu_pass (at most 64 are told apart).
int64_t cpu_last_pass_threads();

// Whether the CPU kernels were compiled with OpenMP, i.e. whether at::parallel_for can use more
// than the calling thread (torch's OpenMP builds).
bool cpu_openmp();

// The CPU kernel variant the passes use ("avx512", "avx2", "neon" or "scalar").
std::string cpu_kernel_isa();

// The variants of this build that this CPU can run, widest first.
std::vector<std::string> cpu_kernel_variants();

// Makes the passes use variant `name` ("auto": the widest this CPU runs); throws if this build
// lacks it or this CPU cannot run it.
void select_cpu_variant(const std::string& name);

// select_cpu_variant(FASTZO_CPU_ISA) at load; an invalid value is reported by every pass.
void select_cpu_variant_from_environment();

// Philox4x32-10 on an int64 (..., 4) tensor of uint32 values, for known-answer tests.
at::Tensor philox4x32_10(const at::Tensor& counters, int64_t k0, int64_t k1);

#ifdef FASTZO_WITH_CUDA
void cuda_pass(const PassRequest& request);
#endif

}  // namespace fastzo
