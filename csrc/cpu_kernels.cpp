// Backend "cpp": the noise contract's passes over CPU tensors, in place.
//
// Work is split into fixed chunks of the global element index (kChunk, a multiple of 128), and
// chunks are shared among threads with at::parallel_for. Each element's result is a pure
// function of (seed, key, global index, its own value), so the output does not depend on the
// number of threads or on how a tensor is sharded.
//
// Inside a chunk, blocks of kBlock elements are processed in two loops that the compiler
// vectorises: one fills an L1-resident buffer with z (Philox and Box-Muller on whole vectors of
// counters, with the branch-free float32 approximations of noise_contract.h), one applies the
// pass to the weights. On x86-64 with GCC both loops are compiled three times (AVX-512, AVX2,
// baseline SSE2) and the best one for the running CPU is picked at load time, so one build runs
// everywhere and still uses wide vectors.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <bitset>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "noise_contract.h"

// target_clones needs GCC and glibc's ifunc (musl has none).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FASTZO_NO_MULTIVERSION)
#if __GNUC__ >= 12
#define FASTZO_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTZO_ISA_WIDE "x86-64-v4"
#define FASTZO_ISA_MEDIUM "x86-64-v3"
#else
#define FASTZO_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#define FASTZO_ISA_WIDE "avx512f"
#define FASTZO_ISA_MEDIUM "avx2"
#endif
#else
#define FASTZO_MULTIVERSION
#endif

#if defined(__GNUC__)
#define FASTZO_INLINE inline __attribute__((always_inline))
#define FASTZO_RESTRICT __restrict__
#else
#define FASTZO_INLINE inline
#define FASTZO_RESTRICT
#endif

namespace fastzo {
namespace {

using namespace contract;

// Noise is generated kBlock elements at a time into stack buffers that stay in L1.
constexpr int64_t kBlock = 1024;
// Unit of parallel work, in the global element index: independent of the thread count.
constexpr int64_t kChunk = 16 * kBlock;
static_assert(kBlock % kRademacherPerCall == 0, "a block must hold whole Philox groups");

// ---------------------------------------------------------------------------------------------
// Noise for one block: elements [block_start, block_start + kBlock) of a tensor, block_start a
// multiple of kBlock. Group indices inside a block never cross a 2^32 boundary (kBlock / 4
// divides 2^32), so the counter's high word is constant and the low word a plain uint32 loop.

FASTZO_MULTIVERSION void gaussian_block(float* FASTZO_RESTRICT z, uint64_t block_start,
                                        uint32_t key, uint32_t seed_lo, uint32_t seed_hi) {
  const uint64_t first_group = block_start / kGaussianPerCall;
  const uint32_t group_lo = static_cast<uint32_t>(first_group);
  const uint32_t group_hi = static_cast<uint32_t>(first_group >> 32);
  for (int g = 0; g < kBlock / kGaussianPerCall; ++g) {
    const PhiloxWords w =
        philox_group(group_lo + g, group_hi, key, kStreamGaussian, seed_lo, seed_hi);
    float z0, z1, z2, z3;
    gaussian4(w, z0, z1, z2, z3);
    z[4 * g + 0] = z0;
    z[4 * g + 1] = z1;
    z[4 * g + 2] = z2;
    z[4 * g + 3] = z3;
  }
}

FASTZO_MULTIVERSION void rademacher_block(float* FASTZO_RESTRICT z, uint64_t block_start,
                                          uint32_t key, uint32_t seed_lo, uint32_t seed_hi) {
  const uint64_t first_group = block_start / kRademacherPerCall;
  const uint32_t group_lo = static_cast<uint32_t>(first_group);
  const uint32_t group_hi = static_cast<uint32_t>(first_group >> 32);
  for (int g = 0; g < kBlock / kRademacherPerCall; ++g) {
    const PhiloxWords w =
        philox_group(group_lo + g, group_hi, key, kStreamRademacher, seed_lo, seed_hi);
    for (int word = 0; word < 4; ++word) {
      const uint32_t bits = word_at(w, word);
      float* FASTZO_RESTRICT out = z + kRademacherPerCall * g + 32 * word;
      for (int bit = 0; bit < 32; ++bit) out[bit] = rademacher(bits, bit);
    }
  }
}

// The stochastic-rounding comparison values (r + 1/2) 2^-16 of one block.
FASTZO_MULTIVERSION void rounding_block(float* FASTZO_RESTRICT u, uint64_t block_start,
                                        uint32_t key, uint32_t seed_lo, uint32_t seed_hi) {
  const uint64_t first_group = block_start / kRoundingPerCall;
  const uint32_t group_lo = static_cast<uint32_t>(first_group);
  const uint32_t group_hi = static_cast<uint32_t>(first_group >> 32);
  for (int g = 0; g < kBlock / kRoundingPerCall; ++g) {
    const PhiloxWords w =
        philox_group(group_lo + g, group_hi, key, kStreamRounding, seed_lo, seed_hi);
    for (int h = 0; h < kRoundingPerCall; ++h) {
      u[kRoundingPerCall * g + h] = rounding_uniform(rounding_half(w, h));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Storage formats: float32 arithmetic on every dtype, 16-bit values handled as raw bits.

struct Float32Storage {
  using Element = float;
  static FASTZO_INLINE float load(float v) { return v; }
  static FASTZO_INLINE float store_nearest(float y) { return y; }
  static FASTZO_INLINE float store_stochastic(float y, float) { return y; }
};

template <class Format>
struct HalfStorage {
  using Element = uint16_t;
  static FASTZO_INLINE float load(uint16_t v) { return Format::to_float(v); }
  static FASTZO_INLINE uint16_t store_nearest(float y) {
    return static_cast<uint16_t>(Format::round_nearest(y));
  }
  static FASTZO_INLINE uint16_t store_stochastic(float y, float u) {
    return static_cast<uint16_t>(round_stochastic<Format>(y, u));
  }
};

enum class StorageKind { kFloat32, kBFloat16, kFloat16 };

// What the apply loop does with an element: perturb, or update (optionally rounding
// stochastically, optionally fused with the next step's perturbation).
struct PassKind {
  bool update, stochastic, next;
};

struct ApplyArgs {
  void* data;            // first element to write
  const float* z;        // its z
  const float* u;        // its stochastic-rounding value (stochastic only)
  const float* z_next;   // its z for the next seed (next only)
  int64_t count;
  float a, decay, b, a_next;
};

template <class Storage, bool kUpdate, bool kStochastic, bool kNext>
FASTZO_INLINE void apply_loop(const ApplyArgs& args) {
  auto* FASTZO_RESTRICT theta = static_cast<typename Storage::Element*>(args.data);
  const float* FASTZO_RESTRICT z = args.z;
  const float* FASTZO_RESTRICT u = args.u;
  const float* FASTZO_RESTRICT z_next = args.z_next;
  const float a = args.a, decay = args.decay, b = args.b, a_next = args.a_next;
  for (int64_t i = 0; i < args.count; ++i) {
    const float value = Storage::load(theta[i]);
    float y = kUpdate ? restored_and_updated(value, a, decay, b, z[i]) : perturbed(value, a, z[i]);
    if (kNext) y = updated_and_perturbed(y, a_next, z_next[i]);
    theta[i] = kStochastic ? Storage::store_stochastic(y, u[i]) : Storage::store_nearest(y);
  }
}

template <class Storage, bool kStochastic>
FASTZO_INLINE void apply_update(PassKind pass, const ApplyArgs& args) {
  if (pass.next) {
    apply_loop<Storage, true, kStochastic, true>(args);
  } else {
    apply_loop<Storage, true, kStochastic, false>(args);
  }
}

template <class Storage>
FASTZO_INLINE void apply_storage(PassKind pass, const ApplyArgs& args) {
  if (!pass.update) {
    apply_loop<Storage, false, false, false>(args);
  } else if (pass.stochastic) {
    apply_update<Storage, true>(pass, args);
  } else {
    apply_update<Storage, false>(pass, args);
  }
}

FASTZO_MULTIVERSION void apply_block(StorageKind storage, PassKind pass, const ApplyArgs& args) {
  switch (storage) {
    case StorageKind::kFloat32:
      // float32 results are exact: stochastic rounding has nothing to round.
      return apply_storage<Float32Storage>(PassKind{pass.update, false, pass.next}, args);
    case StorageKind::kBFloat16: return apply_storage<HalfStorage<BFloat16Format>>(pass, args);
    case StorageKind::kFloat16: return apply_storage<HalfStorage<Float16Format>>(pass, args);
  }
}

// ---------------------------------------------------------------------------------------------
// Exact mode (16-bit only): integer steps on the tensor's grid (noise_contract.h).

template <class Format, bool kUpdate, bool kStochastic, bool kNext>
FASTZO_INLINE void exact_loop(const ApplyArgs& args, int32_t exponent, int32_t multiple) {
  auto* FASTZO_RESTRICT theta = static_cast<uint16_t*>(args.data);
  const float* FASTZO_RESTRICT z = args.z;
  const float* FASTZO_RESTRICT u = args.u;
  const float* FASTZO_RESTRICT z_next = args.z_next;
  const Grid g = make_grid<Format>(exponent);
  const float a_q = mul_rn(args.a, g.inv_q), a_next_q = mul_rn(args.a_next, g.inv_q);
  const float decay = args.decay, b = args.b;
  for (int64_t i = 0; i < args.count; ++i) {
    const uint32_t h = theta[i];
    const uint32_t out =
        kUpdate ? exact_restored_and_updated<Format, kStochastic, kNext>(
                      h, a_q, decay, b, z[i], kStochastic ? u[i] : 0.0f, a_next_q,
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

void noise_block(float* z, bool gaussian, uint64_t block_start, uint32_t key, uint32_t seed_lo,
                 uint32_t seed_hi) {
  if (gaussian) {
    gaussian_block(z, block_start, key, seed_lo, seed_hi);
  } else {
    rademacher_block(z, block_start, key, seed_lo, seed_hi);
  }
}

// Local elements [begin, end) of one tensor, all inside one chunk.
void run_range(const TensorJob& job, int64_t begin, int64_t end, const PassConstants& c) {
  alignas(64) float z[kBlock];
  alignas(64) float u[kBlock];
  alignas(64) float z_next[kBlock];
  const bool stochastic = c.pass.stochastic && job.storage != StorageKind::kFloat32;
  while (begin < end) {
    const int64_t global = job.offset + begin;
    const int64_t block_start = global - global % kBlock;
    const int64_t stop = std::min(end, block_start + kBlock - job.offset);
    const uint64_t start = static_cast<uint64_t>(block_start);
    noise_block(z, c.gaussian, start, job.key, c.seed_lo, c.seed_hi);
    if (stochastic) rounding_block(u, start, job.key, c.seed_lo, c.seed_hi);
    if (c.pass.next) noise_block(z_next, c.gaussian, start, job.key, c.next_seed_lo, c.next_seed_hi);
    const int64_t skip = global - block_start;
    const ApplyArgs args{job.data + begin * job.element_size, z + skip, u + skip, z_next + skip,
                         stop - begin, c.a, c.decay, c.b, c.a_next};
    if (c.exact) {
      exact_apply_block(job.storage, c.pass, args, job.exponent, c.multiple);
    } else {
      apply_block(job.storage, c.pass, args);
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
      run_range(*job, begin, end, constants);
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

std::string cpu_kernel_isa() {
#if defined(FASTZO_ISA_WIDE)
  // The same test, in the same order, as the resolver of the target clones.
  __builtin_cpu_init();
  if (__builtin_cpu_supports(FASTZO_ISA_WIDE)) return FASTZO_ISA_WIDE;
  if (__builtin_cpu_supports(FASTZO_ISA_MEDIUM)) return FASTZO_ISA_MEDIUM;
  return "x86-64 baseline";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "compiler default";
#endif
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
