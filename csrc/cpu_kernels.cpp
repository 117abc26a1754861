// Backend "cpp": the noise contract's passes over CPU tensors, in place.
//
// Work is split into fixed chunks of the global element index (kChunk, a multiple of 128), and
// chunks are shared among threads with at::parallel_for. Each element's result is a pure
// function of (seed, key, global index, its own value), so the output does not depend on the
// number of threads or on how a tensor is sharded.
//
// Inside a chunk, blocks of kBlock elements are processed in two steps: one fills L1-resident
// buffers with z (and the stochastic-rounding values), one applies the pass to the weights. Both
// come from a variant of cpu_simd.h (AVX-512, AVX2, NEON or the scalar reference, all giving the
// same bits), chosen when the module is loaded: FASTZO_CPU_ISA if set, else the widest one the
// CPU runs.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <bitset>
#include <cstdlib>
#include <string>
#include <cstdint>
#include <vector>

#include "cpu_simd.h"
#include "kernels.h"
#include "noise_contract.h"

// target_clones needs GCC and glibc's ifunc (musl has none). Only the exact mode's loops use it;
// the other passes have explicit vector variants (cpu_simd.h).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FASTZO_NO_MULTIVERSION)
#if __GNUC__ >= 12
#define FASTZO_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTZO_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define FASTZO_MULTIVERSION
#endif

namespace fastzo {
namespace {

using namespace contract;
using cpu::ApplyArgs;
using cpu::kBlock;
using cpu::PassKind;
using cpu::StorageKind;
using cpu::Variant;

// Unit of parallel work, in the global element index: independent of the thread count.
constexpr int64_t kChunk = 16 * kBlock;

// The variant the passes use: FASTZO_CPU_ISA when the module is loaded (select_cpu_variant),
// else the widest one this CPU runs. An invalid FASTZO_CPU_ISA is reported by every pass.
std::atomic<const Variant*> current_variant{nullptr};
std::string variant_error;  // written once, at load, before any pass

const Variant* variant_or_throw() {
  const Variant* v = current_variant.load(std::memory_order_acquire);
  TORCH_CHECK(v != nullptr, variant_error);
  return v;
}

std::string variant_names() {
  std::string names;
  for (const Variant& v : cpu::kVariants) names += (names.empty() ? "" : ", ") + std::string(v.name);
  return names;
}

// ---------------------------------------------------------------------------------------------
// Exact mode (16-bit only): integer steps on the tensor's grid (noise_contract.h).

template <class Format, bool kUpdate, bool kStochastic, bool kNext>
FASTZO_INLINE void exact_loop(const ApplyArgs& args, int32_t exponent, int32_t multiple) {
  auto* FASTZO_RESTRICT theta = static_cast<uint16_t*>(args.data);
  const float* FASTZO_RESTRICT z = args.z;
  const uint16_t* FASTZO_RESTRICT r = args.r;
  const float* FASTZO_RESTRICT z_next = args.z_next;
  const Grid g = make_grid<Format>(exponent);
  const float a_q = mul_rn(args.a, g.inv_q), a_next_q = mul_rn(args.a_next, g.inv_q);
  const float decay = args.decay, b = args.b;
  for (int64_t i = 0; i < args.count; ++i) {
    const uint32_t h = theta[i];
    const uint32_t out =
        kUpdate ? exact_restored_and_updated<Format, kStochastic, kNext>(
                      h, a_q, decay, b, z[i], kStochastic ? rounding_uniform(r[i]) : 0.0f, a_next_q,
                      kNext ? z_next[i] : 0.0f, g)
                : exact_perturbed(h, a_q, multiple, z[i], g);
    theta[i] = static_cast<uint16_t>(out);
  }
}

template <class Format>
FASTZO_INLINE void exact_format(PassKind pass, const ApplyArgs& args, int32_t exponent,
                                int32_t multiple) {
  if (!pass.update) return exact_loop<Format, false, false, false>(args, exponent, multiple);
  if (pass.stochastic) {
    return pass.next ? exact_loop<Format, true, true, true>(args, exponent, multiple)
                     : exact_loop<Format, true, true, false>(args, exponent, multiple);
  }
  return pass.next ? exact_loop<Format, true, false, true>(args, exponent, multiple)
                   : exact_loop<Format, true, false, false>(args, exponent, multiple);
}

FASTZO_MULTIVERSION void exact_apply_block(StorageKind storage, PassKind pass,
                                           const ApplyArgs& args, int32_t exponent,
                                           int32_t multiple) {
  switch (storage) {
    case StorageKind::kBFloat16: return exact_format<BFloat16Format>(pass, args, exponent, multiple);
    case StorageKind::kFloat16: return exact_format<Float16Format>(pass, args, exponent, multiple);
    case StorageKind::kFloat32: return;  // refused by check_request
  }
}

// ---------------------------------------------------------------------------------------------
// Driver.

struct TensorJob {
  char* data;
  int64_t element_size;
  int64_t numel;
  int64_t offset;  // global index of element 0
  uint32_t key;
  StorageKind storage;
  int64_t first_item;  // index of its first chunk in the flat list of work items
  int32_t exponent;    // exact mode: log2 of the tensor's quantum
};

struct PassConstants {
  uint32_t seed_lo, seed_hi, next_seed_lo, next_seed_hi;
  bool gaussian;
  PassKind pass;
  float a, decay, b, a_next;
  bool exact;
  int32_t multiple;
};

StorageKind storage_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return StorageKind::kFloat32;
    case at::kBFloat16: return StorageKind::kBFloat16;
    case at::kHalf: return StorageKind::kFloat16;
    default: TORCH_CHECK(false, "fastzo: unsupported dtype ", dtype);
  }
}

void noise_block(const Variant& v, float* z, bool gaussian, uint64_t block_start, uint32_t key,
                 uint32_t seed_lo, uint32_t seed_hi) {
  if (gaussian) {
    v.gaussian_block(z, block_start, key, seed_lo, seed_hi);
  } else {
    v.rademacher_block(z, block_start, key, seed_lo, seed_hi);
  }
}

// Asks for the weights in [data, data + bytes) to be brought into L2. A pass computes a block's
// noise and then applies it; weights that come from memory would otherwise only start moving
// when the apply step reads them, after the noise work, instead of during it. Measured with the
// block functions on 10^8 bfloat16 weights (one thread, memory shared with other jobs):
// Rademacher perturb 0.43 -> 0.34 ns per element, restore-and-update with stochastic rounding
// 0.73 -> 0.53; no change in cache.
inline void prefetch_to_l2(const char* data, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(data + offset, 0, 1);
}

// Local elements [begin, end) of one tensor, all inside one chunk.
void run_range(const Variant& v, const TensorJob& job, int64_t begin, int64_t end,
               const PassConstants& c) {
  alignas(64) float z[kBlock];
  alignas(64) uint16_t r[kBlock];
  alignas(64) float z_next[kBlock];
  const bool stochastic = c.pass.stochastic && job.storage != StorageKind::kFloat32;
  prefetch_to_l2(job.data + begin * job.element_size,
                 (std::min(end, begin + kBlock) - begin) * job.element_size);
  while (begin < end) {
    const int64_t global = job.offset + begin;
    const int64_t block_start = global - global % kBlock;
    const int64_t stop = std::min(end, block_start + kBlock - job.offset);
    const uint64_t start = static_cast<uint64_t>(block_start);
    // the next block's weights, while this block's noise is computed
    prefetch_to_l2(job.data + stop * job.element_size,
                   (std::min(end, stop + kBlock) - stop) * job.element_size);
    noise_block(v, z, c.gaussian, start, job.key, c.seed_lo, c.seed_hi);
    if (stochastic) v.rounding_block(r, start, job.key, c.seed_lo, c.seed_hi);
    if (c.pass.next) {
      noise_block(v, z_next, c.gaussian, start, job.key, c.next_seed_lo, c.next_seed_hi);
    }
    const int64_t skip = global - block_start;
    const ApplyArgs args{job.data + begin * job.element_size, z + skip, r + skip, z_next + skip,
                         stop - begin, c.a, c.decay, c.b, c.a_next};
    if (c.exact) {
      exact_apply_block(job.storage, c.pass, args, job.exponent, c.multiple);
    } else {
      v.apply_block(job.storage, c.pass, args);
    }
    begin = stop;
  }
}

// Which threads (at::get_thread_num(), bit i for thread i mod 64) did work in the latest pass:
// the tests check that passes really run in parallel. One relaxed fetch_or per parallel_for
// range, not per element.
std::atomic<uint64_t> last_pass_threads{0};

}  // namespace

void cpu_pass(const PassRequest& request) {
  const Variant& variant = *variant_or_throw();
  check_request(request, c10::DeviceType::CPU);
  bump_versions(request);
  const size_t n = request.tensors.size();
  std::vector<TensorJob> jobs;
  jobs.reserve(n);
  int64_t items = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = request.tensors[i];
    if (t.numel() == 0) continue;
    const int64_t offset = request.offsets[i];
    const int64_t first_chunk = offset / kChunk;
    const int64_t last_chunk = (offset + t.numel() - 1) / kChunk;
    jobs.push_back(TensorJob{static_cast<char*>(t.data_ptr()), t.element_size(), t.numel(), offset,
                             static_cast<uint32_t>(request.keys[i]), storage_kind(t.scalar_type()),
                             items,
                             request.exact ? static_cast<int32_t>(request.exponents[i]) : 0});
    items += last_chunk - first_chunk + 1;
  }
  last_pass_threads.store(0, std::memory_order_relaxed);
  if (items == 0) return;
  const PassConstants constants{
      static_cast<uint32_t>(request.seed),
      static_cast<uint32_t>(request.seed >> 32),
      static_cast<uint32_t>(request.next_seed),
      static_cast<uint32_t>(request.next_seed >> 32),
      request.gaussian,
      PassKind{request.update, request.update && request.stochastic,
               request.update && request.has_next},
      request.a,
      request.decay,
      request.b,
      request.a_next,
      request.exact,
      request.multiple};

  at::parallel_for(0, items, 1, [&](int64_t item_begin, int64_t item_end) {
    last_pass_threads.fetch_or(uint64_t{1} << (at::get_thread_num() % 64),
                               std::memory_order_relaxed);
    // The job holding item_begin: the last one whose first item is <= item_begin.
    auto job = std::upper_bound(jobs.begin(), jobs.end(), item_begin,
                                [](int64_t item, const TensorJob& j) { return item < j.first_item; }) - 1;
    for (int64_t item = item_begin; item < item_end; ++item) {
      while (job + 1 != jobs.end() && (job + 1)->first_item <= item) ++job;
      const int64_t chunk = job->offset / kChunk + (item - job->first_item);
      const int64_t begin = std::max<int64_t>(0, chunk * kChunk - job->offset);
      const int64_t end = std::min<int64_t>(job->numel, (chunk + 1) * kChunk - job->offset);
      run_range(variant, *job, begin, end, constants);
    }
  });
}

int64_t cpu_last_pass_threads() {
  const uint64_t mask = last_pass_threads.load(std::memory_order_relaxed);
  return static_cast<int64_t>(std::bitset<64>(mask).count());
}

bool cpu_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string cpu_kernel_isa() { return variant_or_throw()->name; }

std::vector<std::string> cpu_kernel_variants() {
  std::vector<std::string> names;
  for (const Variant& v : cpu::kVariants) {
    if (cpu::cpu_can_run(v)) names.emplace_back(v.name);
  }
  return names;
}

void select_cpu_variant(const std::string& name) {
  const Variant* v = nullptr;
  if (name.empty() || name == "auto") {
    v = cpu::best_variant();
  } else {
    v = cpu::find_variant(name.c_str());
    TORCH_CHECK(v != nullptr, "fastzo: FASTZO_CPU_ISA=", name, " is not a CPU kernel variant of "
                "this build (it has ", variant_names(), "; or auto)");
    TORCH_CHECK(cpu::cpu_can_run(*v), "fastzo: FASTZO_CPU_ISA=", name,
                " needs instructions this CPU lacks; it runs ", cpu_kernel_variants());
  }
  current_variant.store(v, std::memory_order_release);
}

void select_cpu_variant_from_environment() {
  const char* value = std::getenv("FASTZO_CPU_ISA");
  try {
    select_cpu_variant(value == nullptr ? "" : value);
  } catch (const c10::Error& error) {
    variant_error = error.what_without_backtrace();
    current_variant.store(nullptr, std::memory_order_release);
  }
}

at::Tensor philox4x32_10(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() >= 1 && counters.size(-1) == 4,
              "counters must be an int64 tensor of shape (..., 4)");
  TORCH_CHECK(counters.device().is_cpu(), "counters must be a CPU tensor");
  TORCH_CHECK(k0 >= 0 && k0 <= 0xFFFFFFFFLL && k1 >= 0 && k1 <= 0xFFFFFFFFLL,
              "key words must be uint32");
  const at::Tensor in = counters.contiguous();
  const int64_t* src = in.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.numel(); ++i) {
    TORCH_CHECK(src[i] >= 0 && src[i] <= 0xFFFFFFFFLL, "counters must hold uint32 values");
  }
  at::Tensor out = at::empty_like(in);
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.numel(); i += 4) {
    const PhiloxWords w = philox_group(
        static_cast<uint32_t>(src[i]), static_cast<uint32_t>(src[i + 1]),
        static_cast<uint32_t>(src[i + 2]), static_cast<uint32_t>(src[i + 3]),
        static_cast<uint32_t>(k0), static_cast<uint32_t>(k1));
    dst[i] = w.x0;
    dst[i + 1] = w.x1;
    dst[i + 2] = w.x2;
    dst[i + 3] = w.x3;
  }
  return out;
}

}  // namespace fastzo
