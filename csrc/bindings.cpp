// Python bindings of fastzo._C.
//
// Plain pybind11 functions (PYBIND11_MODULE through torch's extension build), not
// torch.library custom ops: the passes mutate a list of tensors in place, take a uint64 seed
// (a torch.library schema has int64 only) and are called from eager Python code under no_grad,
// never traced by autograd or torch.compile. pybind11 gives that with no dispatcher overhead
// per call, and lets the GIL go while the kernels run. See docs/native.md.

#include <torch/extension.h>

#include <cmath>
#include <string>
#include <unordered_set>

#include "kernels.h"
#include "noise_contract.h"

namespace fastzo {

void check_request(const PassRequest& r, c10::DeviceType device_type) {
  const size_t n = r.tensors.size();
  TORCH_CHECK(r.keys.size() == n, "got ", r.keys.size(), " keys for ", n, " tensors");
  TORCH_CHECK(r.offsets.size() == n, "got ", r.offsets.size(), " offsets for ", n, " tensors");
  std::unordered_set<int64_t> keys;
  std::unordered_set<const void*> addresses;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = r.tensors[i];
    TORCH_CHECK(t.defined(), "tensor ", i, " is undefined");
    TORCH_CHECK(t.device().type() == device_type, "tensor ", i, " is on ", t.device(),
                ", expected a ", c10::DeviceTypeName(device_type), " tensor");
    TORCH_CHECK(t.device() == r.tensors[0].device(), "all tensors must be on one device");
    const auto dtype = t.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "tensor ", i,
                " has dtype ", dtype, "; expected float32, bfloat16 or float16");
    TORCH_CHECK(t.is_contiguous(), "tensor ", i, " is not contiguous");
    TORCH_CHECK(r.keys[i] >= 0 && r.keys[i] <= 0xFFFFFFFFLL, "key ", r.keys[i], " is not a uint32");
    TORCH_CHECK(keys.insert(r.keys[i]).second, "key ", r.keys[i], " appears twice");
    TORCH_CHECK(r.offsets[i] >= 0 && r.offsets[i] <= (int64_t{1} << 62) - t.numel(), "offset ",
                r.offsets[i], " of tensor ", i, " is outside [0, 2**62 - numel]");
    if (t.numel() > 0) {
      TORCH_CHECK(addresses.insert(t.data_ptr()).second, "tensor ", i, " appears twice");
    }
  }
  if (r.exact) {
    TORCH_CHECK(r.exponents.size() == n, "got ", r.exponents.size(), " quantum exponents for ", n,
                " tensors");
    TORCH_CHECK(r.multiple >= -256 && r.multiple <= 256, "multiple ", r.multiple,
                " is outside [-256, 256]");
    for (size_t i = 0; i < n; ++i) {
      const auto dtype = r.tensors[i].scalar_type();
      TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "tensor ", i, " has dtype ", dtype,
                  "; exact mode is for bfloat16/float16 tensors");
      const int64_t low = dtype == at::kBFloat16 ? -126 : -24;
      const int64_t high = dtype == at::kBFloat16 ? 120 : 5;
      const int64_t e = r.exponents[i];
      TORCH_CHECK(e >= low && e <= high, "quantum exponent ", e, " of tensor ", i,
                  " is outside [", low, ", ", high, "]");
      // |multiple| (6 |eps| / q + 1) <= 2 Nmax + 1: a step is shorter than the index ring.
      const int64_t mbits = dtype == at::kBFloat16 ? 7 : 10;
      const int64_t bias = dtype == at::kBFloat16 ? 127 : 15;
      const int64_t max_bits = dtype == at::kBFloat16 ? 0x7F7F : 0x7BFF;
      const int64_t ring = 2 * ((int64_t{1} << mbits) + max_bits - ((e + bias + mbits) << mbits)) + 1;
      const double multiple = r.update ? 1.0 : std::fabs(static_cast<double>(r.multiple));
      for (const float eps : {r.a, r.a_next}) {
        const double steps = 6.0 * std::ldexp(std::fabs(static_cast<double>(eps)), static_cast<int>(-e));
        TORCH_CHECK(multiple * (steps + 1.0) <= static_cast<double>(ring), "eps ", eps,
                    " is too many quanta 2**", e, " of tensor ", i, " for one step");
      }
    }
  }
}

void bump_versions(const PassRequest& r) {
  // Like any in-place op: autograd can then tell that a saved tensor was changed.
  for (const at::Tensor& t : r.tensors) t.unsafeGetTensorImpl()->bump_version();
}

namespace {

PassRequest make_request(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                         std::vector<int64_t> offsets, uint64_t seed,
                         const std::string& distribution) {
  TORCH_CHECK(distribution == "gaussian" || distribution == "rademacher",
              "distribution must be 'gaussian' or 'rademacher', got '", distribution, "'");
  PassRequest r;
  r.tensors = std::move(tensors);
  r.keys = std::move(keys);
  r.offsets = std::move(offsets);
  r.seed = seed;
  r.gaussian = distribution == "gaussian";
  return r;
}

using PassFunction = void (*)(const PassRequest&);

PassRequest perturb_request(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                            std::vector<int64_t> offsets, uint64_t seed, double scale,
                            const std::string& distribution) {
  PassRequest r = make_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                               distribution);
  r.a = static_cast<float>(scale);
  return r;
}

PassRequest update_request(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                           std::vector<int64_t> offsets, uint64_t seed, double eps, double decay,
                           double step, const std::string& distribution, bool stochastic_rounding) {
  PassRequest r = make_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                               distribution);
  r.update = true;
  r.stochastic = stochastic_rounding;
  r.a = static_cast<float>(eps);
  r.decay = static_cast<float>(decay);
  r.b = static_cast<float>(step);
  return r;
}

PassRequest fused_request(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                          std::vector<int64_t> offsets, uint64_t seed, double eps, double decay,
                          double step, const std::string& distribution, bool stochastic_rounding,
                          uint64_t next_seed, double next_scale) {
  PassRequest r = update_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                                 eps, decay, step, distribution, stochastic_rounding);
  r.has_next = true;
  r.next_seed = next_seed;
  r.a_next = static_cast<float>(next_scale);
  return r;
}

template <PassFunction kPass>
void perturb(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
             std::vector<int64_t> offsets, uint64_t seed, double scale,
             const std::string& distribution) {
  kPass(perturb_request(std::move(tensors), std::move(keys), std::move(offsets), seed, scale,
                        distribution));
}

template <PassFunction kPass>
void restore_and_update(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                        std::vector<int64_t> offsets, uint64_t seed, double eps, double decay,
                        double step, const std::string& distribution, bool stochastic_rounding) {
  kPass(update_request(std::move(tensors), std::move(keys), std::move(offsets), seed, eps, decay,
                       step, distribution, stochastic_rounding));
}

template <PassFunction kPass>
void restore_update_and_perturb(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                                std::vector<int64_t> offsets, uint64_t seed, double eps,
                                double decay, double step, const std::string& distribution,
                                bool stochastic_rounding, uint64_t next_seed, double next_scale) {
  kPass(fused_request(std::move(tensors), std::move(keys), std::move(offsets), seed, eps, decay,
                      step, distribution, stochastic_rounding, next_seed, next_scale));
}

#ifdef FASTZO_WITH_CUDA
// The CUDA passes also take fast math (the Gaussian passes' hardware sine, cosine and square
// root; docs/noise.md), chosen per call by backend "cuda".
void cuda_perturb(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                  std::vector<int64_t> offsets, uint64_t seed, double scale,
                  const std::string& distribution, bool fast_math) {
  PassRequest r = perturb_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                                  scale, distribution);
  r.fast_math = fast_math;
  cuda_pass(r);
}

void cuda_restore_and_update(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                             std::vector<int64_t> offsets, uint64_t seed, double eps,
                             double decay, double step, const std::string& distribution,
                             bool stochastic_rounding, bool fast_math) {
  PassRequest r = update_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                                 eps, decay, step, distribution, stochastic_rounding);
  r.fast_math = fast_math;
  cuda_pass(r);
}

void cuda_restore_update_and_perturb(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                                     std::vector<int64_t> offsets, uint64_t seed, double eps,
                                     double decay, double step, const std::string& distribution,
                                     bool stochastic_rounding, uint64_t next_seed,
                                     double next_scale, bool fast_math) {
  PassRequest r = fused_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                                eps, decay, step, distribution, stochastic_rounding, next_seed,
                                next_scale);
  r.fast_math = fast_math;
  cuda_pass(r);
}
#endif

template <PassFunction kPass>
void exact_perturb(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                   std::vector<int64_t> offsets, uint64_t seed, double eps, int64_t multiple,
                   std::vector<int64_t> exponents, const std::string& distribution) {
  PassRequest r = make_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                               distribution);
  TORCH_CHECK(multiple >= -256 && multiple <= 256, "multiple ", multiple, " is outside [-256, 256]");
  r.exact = true;
  r.multiple = static_cast<int32_t>(multiple);
  r.exponents = std::move(exponents);
  r.a = static_cast<float>(eps);
  kPass(r);
}

template <PassFunction kPass>
void exact_restore_and_update(std::vector<at::Tensor> tensors, std::vector<int64_t> keys,
                              std::vector<int64_t> offsets, uint64_t seed, double eps,
                              double decay, double step, const std::string& distribution,
                              bool stochastic_rounding, std::vector<int64_t> exponents,
                              bool has_next, uint64_t next_seed, double next_eps) {
  PassRequest r = make_request(std::move(tensors), std::move(keys), std::move(offsets), seed,
                               distribution);
  r.exact = true;
  r.exponents = std::move(exponents);
  r.update = true;
  r.stochastic = stochastic_rounding;
  r.a = static_cast<float>(eps);
  r.decay = static_cast<float>(decay);
  r.b = static_cast<float>(step);
  r.has_next = has_next;
  r.next_seed = next_seed;
  r.a_next = static_cast<float>(next_eps);
  kPass(r);
}

}  // namespace
}  // namespace fastzo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace py::literals;
  m.doc() = "fastzo native kernels: the noise contract's passes in C++ (CPU) and CUDA";
  m.attr("ABI_VERSION") = fastzo::contract::kAbiVersion;
#ifdef FASTZO_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif

  m.def("philox4x32_10", &fastzo::philox4x32_10, "counters"_a, "k0"_a, "k1"_a,
        "Philox4x32-10 of an int64 (..., 4) tensor of uint32 counters (known-answer tests).");

  fastzo::select_cpu_variant_from_environment();
  m.def("cpu_kernel_isa", &fastzo::cpu_kernel_isa,
        "The CPU kernel variant the passes use: avx512, avx2, neon or scalar (FASTZO_CPU_ISA "
        "forces one when the module is loaded).");
  m.def("cpu_kernel_variants", &fastzo::cpu_kernel_variants,
        "The CPU kernel variants of this build that this CPU can run, widest first.");
  m.def("_select_cpu_kernel_isa", &fastzo::select_cpu_variant, "name"_a,
        "Switch the CPU kernel variant (tests; not thread-safe with a running pass).");

  m.def("cpu_last_pass_threads", &fastzo::cpu_last_pass_threads,
        "How many threads did work in the latest CPU pass (thread-count tests).");
  m.attr("CPU_OPENMP") = fastzo::cpu_openmp();

  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("cpu_perturb_", &fastzo::perturb<fastzo::cpu_pass>, "tensors"_a, "keys"_a, "offsets"_a,
        "seed"_a, "scale"_a, "distribution"_a, release_gil);
  m.def("cpu_restore_and_update_", &fastzo::restore_and_update<fastzo::cpu_pass>, "tensors"_a,
        "keys"_a, "offsets"_a, "seed"_a, "eps"_a, "decay"_a, "step"_a, "distribution"_a,
        "stochastic_rounding"_a, release_gil);
  m.def("cpu_restore_update_and_perturb_", &fastzo::restore_update_and_perturb<fastzo::cpu_pass>,
        "tensors"_a, "keys"_a, "offsets"_a, "seed"_a, "eps"_a, "decay"_a, "step"_a,
        "distribution"_a, "stochastic_rounding"_a, "next_seed"_a, "next_scale"_a, release_gil);
  m.def("cpu_exact_perturb_", &fastzo::exact_perturb<fastzo::cpu_pass>, "tensors"_a, "keys"_a,
        "offsets"_a, "seed"_a, "eps"_a, "multiple"_a, "exponents"_a, "distribution"_a, release_gil);
  m.def("cpu_exact_restore_and_update_", &fastzo::exact_restore_and_update<fastzo::cpu_pass>,
        "tensors"_a, "keys"_a, "offsets"_a, "seed"_a, "eps"_a, "decay"_a, "step"_a,
        "distribution"_a, "stochastic_rounding"_a, "exponents"_a, "has_next"_a, "next_seed"_a,
        "next_eps"_a, release_gil);
#ifdef FASTZO_WITH_CUDA
  m.def("cuda_exact_perturb_", &fastzo::exact_perturb<fastzo::cuda_pass>, "tensors"_a, "keys"_a,
        "offsets"_a, "seed"_a, "eps"_a, "multiple"_a, "exponents"_a, "distribution"_a, release_gil);
  m.def("cuda_exact_restore_and_update_", &fastzo::exact_restore_and_update<fastzo::cuda_pass>,
        "tensors"_a, "keys"_a, "offsets"_a, "seed"_a, "eps"_a, "decay"_a, "step"_a,
        "distribution"_a, "stochastic_rounding"_a, "exponents"_a, "has_next"_a, "next_seed"_a,
        "next_eps"_a, release_gil);
  m.def("cuda_perturb_", &fastzo::cuda_perturb, "tensors"_a, "keys"_a, "offsets"_a, "seed"_a,
        "scale"_a, "distribution"_a, "fast_math"_a, release_gil);
  m.def("cuda_restore_and_update_", &fastzo::cuda_restore_and_update, "tensors"_a, "keys"_a,
        "offsets"_a, "seed"_a, "eps"_a, "decay"_a, "step"_a, "distribution"_a,
        "stochastic_rounding"_a, "fast_math"_a, release_gil);
  m.def("cuda_restore_update_and_perturb_", &fastzo::cuda_restore_update_and_perturb,
        "tensors"_a, "keys"_a, "offsets"_a, "seed"_a, "eps"_a, "decay"_a, "step"_a,
        "distribution"_a, "stochastic_rounding"_a, "next_seed"_a, "next_scale"_a, "fast_math"_a,
        release_gil);
#endif
}
