// The CUDA pass kernel, free of torch headers: included by cuda_kernels.cu for the GPU build, and
// by cuda_emulation.cpp, which runs it on the CPU thread by thread so that its indexing (table,
// vectors, alignment, grid-stride) is tested on machines without a GPU.
//
// One launch per storage dtype covers every tensor of a call: a small device-side table holds
// each tensor's (address, numel, key, offset, first vector). The vectors (16 bytes: 4 float32 or
// 8 16-bit elements, aligned in the global element index) of all tensors form one flat index
// space that a grid-stride loop walks, so a model with hundreds of small tensors costs one
// launch and keeps every thread busy. Vectors that are whole and 16-byte aligned are loaded and
// stored with one 16-byte access; the edges of a tensor (and misaligned views) go element by
// element through the same arithmetic.
#pragma once

#include <stdint.h>

#include "noise_contract.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fastzo {
namespace gpu {

using namespace contract;

constexpr int kThreads = 256;
constexpr int kTableColumns = 5;  // address, numel, key, offset, first vector
constexpr int kExactTableColumns = 6;  // exact mode: + log2 of the tensor's quantum

enum StorageCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// bfloat16 on the device: round to nearest even with the hardware conversion (one cvt instead of
// five integer operations; NaN stored as the contract's 0x7FC0), and the
// contract's stochastic rounding in integers: the neighbour towards zero is |y|'s top 16 bits
// and the fraction of the gap is exactly low16 / 2^16, so "u < fraction" is "r < low16"; from
// 0x7F7F0000 on the next value away is inf (or y is inf/NaN) and y rounds to nearest. The same
// decision as round_stochastic<BFloat16Format> for every float32 pattern (the emulation tests
// compare it with the cpp backend bit for bit); about 38 instructions per element fewer on sm_90.
__device__ __forceinline__ uint32_t bf16_round_nearest(float y) {
#if defined(__CUDA_ARCH__)
  const uint32_t rounded = __bfloat16_as_ushort(__float2bfloat16_rn(y));
  return is_nan_f(y) ? 0x7FC0u : rounded;
#else
  return BFloat16Format::round_nearest(y);
#endif
}

// float16 on the device: round to nearest even with the hardware conversion; NaN stored as c10
// stores it (sign | 0x7E00), as Float16Format::round_nearest does on the host.
__device__ __forceinline__ uint32_t f16_round_nearest(float y) {
#if defined(__CUDA_ARCH__)
  const uint32_t rounded = __half_as_ushort(__float2half_rn(y));
  return is_nan_f(y) ? (((float_bits(y) >> 16) & 0x8000u) | 0x7E00u) : rounded;
#else
  return Float16Format::round_nearest(y);
#endif
}

__device__ __forceinline__ uint32_t bf16_round_stochastic(float y, uint32_t r) {
  const uint32_t b = float_bits(y);
  const uint32_t magnitude = b & 0x7FFFFFFFu;
  const uint32_t chosen =
      ((magnitude >> 16) + (r < (magnitude & 0xFFFFu) ? 1u : 0u)) | ((b >> 16) & 0x8000u);
  return magnitude >= 0x7F7F0000u ? bf16_round_nearest(y) : chosen;
}

struct PassConstants {
  uint32_t seed_lo, seed_hi, next_seed_lo, next_seed_hi;
  float a, decay, b, a_next;
  int32_t multiple;  // exact perturb: steps of multiple * k
};

// Storage formats as raw bits; float32 arithmetic on every dtype.
struct Float32Bits {
  using Element = uint32_t;
  static constexpr int kVector = 4;  // elements per 16 bytes
  static constexpr bool kIs16Bit = false;
  __device__ static float to_float(uint32_t bits) { return bits_float(bits); }
  __device__ static uint32_t nearest(float y) { return float_bits(y); }
  __device__ static uint32_t stochastic(float y, uint32_t) { return float_bits(y); }
};

template <class Format>
struct Half16Bits {
  using Element = uint16_t;
  using StorageFormat = Format;
  static constexpr int kVector = 8;
  static constexpr bool kIs16Bit = true;
  static constexpr bool kBFloat16 = Format::kMantissaBits == 7;
  __device__ static float to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
    // float16: the hardware conversion (exact, one instruction instead of about ten)
    if constexpr (!kBFloat16) return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
#endif
    return Format::to_float(bits);
  }
  __device__ static uint32_t nearest(float y) {
    if constexpr (kBFloat16) return bf16_round_nearest(y);
    return f16_round_nearest(y);
  }
  // r: the element's 16 stochastic-rounding bits
  __device__ static uint32_t stochastic(float y, uint32_t r) {
    if constexpr (kBFloat16) return bf16_round_stochastic(y, r);
    return round_stochastic<Format>(y, rounding_uniform(r));
  }
};

// z for the kVector elements from global index `first` (a multiple of kVector; kVector divides
// 128 and 8, so they share one Rademacher word and one rounding call).
template <int kVector, bool kGaussian>
__device__ __forceinline__ void vector_noise(float (&z)[kVector], int64_t first, uint32_t key,
                                             uint32_t seed_lo, uint32_t seed_hi) {
  if constexpr (kGaussian) {
#pragma unroll
    for (int call = 0; call < kVector / kGaussianPerCall; ++call) {
      const uint64_t group = static_cast<uint64_t>(first) / kGaussianPerCall + call;
      const PhiloxWords w = philox_group(static_cast<uint32_t>(group),
                                         static_cast<uint32_t>(group >> 32), key,
                                         kStreamGaussian, seed_lo, seed_hi);
      gaussian4(w, z[4 * call], z[4 * call + 1], z[4 * call + 2], z[4 * call + 3]);
    }
  } else {
    const uint64_t group = static_cast<uint64_t>(first) / kRademacherPerCall;
    const PhiloxWords w = philox_group(static_cast<uint32_t>(group),
                                       static_cast<uint32_t>(group >> 32), key,
                                       kStreamRademacher, seed_lo, seed_hi);
    const int within = static_cast<int>(first % kRademacherPerCall);
    const uint32_t word = word_at(w, within / 32);
#pragma unroll
    for (int j = 0; j < kVector; ++j) z[j] = rademacher(word, within % 32 + j);
  }
}

template <int kVector>
__device__ __forceinline__ void vector_rounding(uint32_t (&r)[kVector], int64_t first, uint32_t key,
                                                uint32_t seed_lo, uint32_t seed_hi) {
  static_assert(kVector <= kRoundingPerCall, "one rounding call per vector");
  const uint64_t group = static_cast<uint64_t>(first) / kRoundingPerCall;
  const PhiloxWords w = philox_group(static_cast<uint32_t>(group),
                                     static_cast<uint32_t>(group >> 32), key, kStreamRounding,
                                     seed_lo, seed_hi);
  const int within = static_cast<int>(first % kRoundingPerCall);
#pragma unroll
  for (int j = 0; j < kVector; ++j) r[j] = rounding_half(w, within + j);
}

template <class Storage, bool kUpdate, bool kStochastic, bool kNext>
__device__ __forceinline__ uint32_t element_result(uint32_t bits, float z, uint32_t r,
                                                   float z_next, const PassConstants& c) {
  const float theta = Storage::to_float(bits);
  float y = kUpdate ? restored_and_updated(theta, c.a, c.decay, c.b, z) : perturbed(theta, c.a, z);
  if (kNext) y = updated_and_perturbed(y, c.a_next, z_next);
  return kStochastic ? Storage::stochastic(y, r) : Storage::nearest(y);
}

// Exact mode (16-bit only): integer steps on the tensor's grid g (noise_contract.h).
template <class Storage, bool kUpdate, bool kStochastic, bool kNext>
__device__ __forceinline__ uint32_t exact_element_result(uint32_t bits, float z, uint32_t r,
                                                         float z_next, const PassConstants& c,
                                                         const Grid& g, float a_q, float a_next_q) {
  if (kUpdate) {
    return exact_restored_and_updated<typename Storage::StorageFormat, kStochastic, kNext>(
        bits, a_q, c.decay, c.b, z, rounding_uniform(r), a_next_q, z_next, g);
  }
  return exact_perturbed(bits, a_q, c.multiple, z, g);
}

// perturb:                 theta <- store(theta + a z)
// update:                  theta <- store((theta + a z) decay - b z)
// update, next:            theta <- store((theta + a z) decay - b z + a_next z(next seed))
// store: round to nearest even, or (kStochastic, 16-bit) the contract's stochastic rounding.
// kExact (16-bit only): the exact passes; the table has a sixth column, the quantum's exponent.
template <class Storage, bool kGaussian, bool kUpdate, bool kStochastic, bool kNext,
          bool kExact = false>
__global__ void __launch_bounds__(kThreads)
    _zo_pass_kernel(const int64_t* __restrict__ table, int n_tensors, PassConstants c) {
  using Element = typename Storage::Element;
  constexpr int kVector = Storage::kVector;
  constexpr int kPerWord = 4 / sizeof(Element);  // elements per 32-bit word of a 16-byte vector
  constexpr uint32_t kMask = kPerWord == 1 ? 0xFFFFFFFFu : 0xFFFFu;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  constexpr int kColumns = kExact ? kExactTableColumns : kTableColumns;
  for (int t = 0; t < n_tensors; ++t) {
    const int64_t* row = table + t * kColumns;
    Element* data = reinterpret_cast<Element*>(row[0]);
    const int64_t numel = row[1];
    const uint32_t key = static_cast<uint32_t>(row[2]);
    const int64_t offset = row[3];
    const int64_t first_vector = row[4];
    const int64_t lead = offset % kVector;  // vectors start on multiples of kVector globally
    const int64_t n_vectors = (lead + numel + kVector - 1) / kVector;
    int64_t v = (thread - first_vector) % stride;  // this thread's first vector of tensor t
    if (v < 0) v += stride;
    Grid grid{};
    float a_q = 0.0f, a_next_q = 0.0f;
    if constexpr (kExact) {
      grid = make_grid<typename Storage::StorageFormat>(static_cast<int32_t>(row[5]));
      a_q = mul_rn(c.a, grid.inv_q);
      a_next_q = mul_rn(c.a_next, grid.inv_q);
    }
    for (; v < n_vectors; v += stride) {
      const int64_t first = offset - lead + v * kVector;
      const int64_t local = first - offset;  // negative for a partial first vector
      float z[kVector], z_next[kVector];
      uint32_t r[kVector];
      vector_noise<kVector, kGaussian>(z, first, key, c.seed_lo, c.seed_hi);
      if (kNext) vector_noise<kVector, kGaussian>(z_next, first, key, c.next_seed_lo, c.next_seed_hi);
      if (kStochastic) vector_rounding<kVector>(r, first, key, c.seed_lo, c.seed_hi);
      const bool whole = local >= 0 && local + kVector <= numel &&
                         reinterpret_cast<uintptr_t>(data + local) % 16 == 0;
      if (whole) {
        uint4* address = reinterpret_cast<uint4*>(data + local);
        const uint4 raw = *address;
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        uint32_t out[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int j = 0; j < kVector; ++j) {
          const int shift = 16 * (j % kPerWord);
          const uint32_t bits = (words[j / kPerWord] >> shift) & kMask;
          uint32_t result;
          if constexpr (kExact) {
            result = exact_element_result<Storage, kUpdate, kStochastic, kNext>(
                bits, z[j], r[j], z_next[j], c, grid, a_q, a_next_q);
          } else {
            result = element_result<Storage, kUpdate, kStochastic, kNext>(bits, z[j], r[j],
                                                                           z_next[j], c);
          }
          out[j / kPerWord] |= result << shift;
        }
        *address = make_uint4(out[0], out[1], out[2], out[3]);
      } else {
#pragma unroll
        for (int j = 0; j < kVector; ++j) {
          const int64_t i = local + j;
          if (i < 0 || i >= numel) continue;
          if constexpr (kExact) {
            data[i] = static_cast<Element>(exact_element_result<Storage, kUpdate, kStochastic, kNext>(
                data[i], z[j], r[j], z_next[j], c, grid, a_q, a_next_q));
          } else {
            data[i] = static_cast<Element>(element_result<Storage, kUpdate, kStochastic, kNext>(
                data[i], z[j], r[j], z_next[j], c));
          }
        }
      }
    }
  }
}

// Table rows for one dtype: fills row[4] (first vector) and returns the total vector count.
inline int64_t number_vectors(int64_t* table, int n_tensors, int storage,
                              int columns = kTableColumns) {
  const int64_t vector = storage == kFloat32 ? 4 : 8;
  int64_t total = 0;
  for (int t = 0; t < n_tensors; ++t) {
    int64_t* row = table + t * columns;
    row[4] = total;
    total += (row[3] % vector + row[1] + vector - 1) / vector;
  }
  return total;
}

using KernelFunction = void (*)(const int64_t*, int, PassConstants);

template <class Storage, bool kGaussian, bool kStochastic>
KernelFunction pick_update(bool next) {
  return next ? &_zo_pass_kernel<Storage, kGaussian, true, kStochastic, true>
              : &_zo_pass_kernel<Storage, kGaussian, true, kStochastic, false>;
}

template <class Storage, bool kGaussian>
KernelFunction pick_pass(bool update, bool stochastic, bool next) {
  if (!update) return &_zo_pass_kernel<Storage, kGaussian, false, false, false>;
  if constexpr (Storage::kIs16Bit) {
    if (stochastic) return pick_update<Storage, kGaussian, true>(next);
  }
  return pick_update<Storage, kGaussian, false>(next);  // float32 results need no rounding
}

template <class Storage>
KernelFunction pick_distribution(bool gaussian, bool update, bool stochastic, bool next) {
  return gaussian ? pick_pass<Storage, true>(update, stochastic, next)
                  : pick_pass<Storage, false>(update, stochastic, next);
}

// The kernel instantiation for one launch.
inline KernelFunction pick_kernel(int storage, bool gaussian, bool update, bool stochastic,
                                  bool next) {
  switch (storage) {
    case kFloat32: return pick_distribution<Float32Bits>(gaussian, update, stochastic, next);
    case kBFloat16:
      return pick_distribution<Half16Bits<BFloat16Format>>(gaussian, update, stochastic, next);
    case kFloat16:
      return pick_distribution<Half16Bits<Float16Format>>(gaussian, update, stochastic, next);
    default: return nullptr;
  }
}

// Exact mode: the kernel instantiation for one launch over 16-bit tensors (nullptr for float32).
template <class Storage, bool kGaussian>
KernelFunction pick_exact_pass(bool update, bool stochastic, bool next) {
  if (!update) return &_zo_pass_kernel<Storage, kGaussian, false, false, false, true>;
  if (stochastic) {
    return next ? &_zo_pass_kernel<Storage, kGaussian, true, true, true, true>
                : &_zo_pass_kernel<Storage, kGaussian, true, true, false, true>;
  }
  return next ? &_zo_pass_kernel<Storage, kGaussian, true, false, true, true>
              : &_zo_pass_kernel<Storage, kGaussian, true, false, false, true>;
}

template <class Storage>
KernelFunction pick_exact_distribution(bool gaussian, bool update, bool stochastic, bool next) {
  return gaussian ? pick_exact_pass<Storage, true>(update, stochastic, next)
                  : pick_exact_pass<Storage, false>(update, stochastic, next);
}

inline KernelFunction pick_exact_kernel(int storage, bool gaussian, bool update, bool stochastic,
                                        bool next) {
  switch (storage) {
    case kBFloat16:
      return pick_exact_distribution<Half16Bits<BFloat16Format>>(gaussian, update, stochastic, next);
    case kFloat16:
      return pick_exact_distribution<Half16Bits<Float16Format>>(gaussian, update, stochastic, next);
    default: return nullptr;
  }
}

}  // namespace gpu
}  // namespace fastzo
