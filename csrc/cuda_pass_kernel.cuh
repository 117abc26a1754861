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

// Round to nearest even, two elements at a time: y0 to the low half of the result, y1 to the
// high half. On the device one cvt.rn.{bf16x2,f16x2}.f32 per pair (a NaN stays a NaN, with the
// hardware's payload); on the host the contract's conversions.
__device__ __forceinline__ uint32_t bf16_nearest_pair(float y0, float y1) {
#if defined(__CUDA_ARCH__)
  const __nv_bfloat162 pair = __floats2bfloat162_rn(y0, y1);
  return *reinterpret_cast<const uint32_t*>(&pair);
#else
  return BFloat16Format::round_nearest(y0) | (BFloat16Format::round_nearest(y1) << 16);
#endif
}

__device__ __forceinline__ uint32_t f16_nearest_pair(float y0, float y1) {
#if defined(__CUDA_ARCH__)
  const __half2 pair = __floats2half2_rn(y0, y1);
  return *reinterpret_cast<const uint32_t*>(&pair);
#else
  return Float16Format::round_nearest(y0) | (Float16Format::round_nearest(y1) << 16);
#endif
}

// The contract's stochastic rounding (round_stochastic) without its division, as the Triton
// kernel does it; the same decision for every float32 y and r (tests/test_triton_kernel.py, and
// the emulation tests against the cpp backend).
//
// bfloat16, in integers: the neighbour towards zero is y's top half, the fraction of the gap is
// exactly low16 / 2^16, so "(r + 1/2) 2^-16 < fraction" is "r < low16", and adding 2^16 to y's
// bits moves the top half one step away from zero. From 0x7F7F0000 on (the next value away is
// inf) and for inf, round to nearest: with r = 0x7FFF the rule goes away exactly when
// low16 >= 0x8000, and 0x7F7F is odd, so ties go away, to the even inf. NaN: 0x7FC0.
// Returns y's bits with the chosen bfloat16 in the high half.
__device__ __forceinline__ uint32_t bf16_stochastic_high(float y, uint32_t r) {
  const uint32_t b = float_bits(y);
  const uint32_t threshold = abs_f(y) >= 3.3895313892515355e+38f ? 0x7FFFu : r;  // 0x7F7F0000
  const uint32_t chosen = b + (threshold < (b & 0xFFFFu) ? 0x10000u : 0u);
  return is_nan_f(y) ? 0x7FC00000u : chosen;  // the contract's NaN
}

__device__ __forceinline__ uint32_t bf16_stochastic_pair(float y0, float y1, uint32_t r0,
                                                         uint32_t r1) {
  const uint32_t high0 = bf16_stochastic_high(y0, r0), high1 = bf16_stochastic_high(y1, r1);
#if defined(__CUDA_ARCH__)
  return __byte_perm(high0, high1, 0x7632);  // the two high halves, one PRMT
#else
  return (high0 >> 16) | (high1 & 0xFFFF0000u);
#endif
}

// float16 of y rounded toward zero (inf and NaN kept, finite overflow to the largest finite
// value); the device converts pairs (f16_toward_zero_pair).
__device__ __forceinline__ uint32_t f16_toward_zero(float y) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rz(y));
#else
  const uint32_t b = float_bits(y);
  const uint32_t a = b & 0x7FFFFFFFu;
  const int32_t e = static_cast<int32_t>(a >> 23);
  const uint32_t significand = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t magnitude = e >= 113 ? (a >> 13) - (112u << 10)                 // normal
                                : significand >> min_i(126 - e, 31);        // multiples of 2^-24
  magnitude = a >= 0x477FE000u ? 0x7BFFu : magnitude;  // from 65504 on: the largest finite
  magnitude = a >= 0x7F800000u ? (a == 0x7F800000u ? 0x7C00u : 0x7E00u) : magnitude;
  return magnitude | ((b >> 16) & 0x8000u);
#endif
}

__device__ __forceinline__ uint32_t f16_toward_zero_pair(float y0, float y1) {
#if defined(__CUDA_ARCH__)
  uint32_t pair;
  asm("cvt.rz.f16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(y1), "f"(y0));  // y1 to the high half
  return pair;
#else
  return f16_toward_zero(y0) | (f16_toward_zero(y1) << 16);
#endif
}

__device__ __forceinline__ float f16_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));  // exact, one cvt
#else
  return Float16Format::to_float(bits);
#endif
}

// float16: t = y toward zero; the gap to the next value away is the float16 spacing at |y|, a
// power of two: 2^(E - 137) for the float32 exponent field E >= 113, 2^-24 below. With
// u = (r + 1/2) 2^-16, "u < (|y| - |t|) / gap" is "u gap < |y| - |t|": both sides exact in
// float32, u gap built from the bits of 1 + u. Adding one to t's bits moves it one step away
// from zero. From 65504 on (the next value away is inf), round to nearest: away exactly when
// |y| - 65504 >= 16 (ties go to the even inf); inf and NaN stay (|y| - |t| is NaN).
// 1 when y goes one step away from zero from toward (its float16 toward zero), else 0.
__device__ __forceinline__ uint32_t f16_stochastic_step(float y, uint32_t toward, uint32_t r) {
  const float y_abs = abs_f(y);
  const float beyond = sub_rn(y_abs, abs_f(f16_to_float(toward)));  // exact: the dropped bits
  const int32_t exponent = static_cast<int32_t>(float_bits(y) & 0x7F800000u);
  const float gap = bits_float(static_cast<uint32_t>(max_i(exponent - (10 << 23), 103 << 23)));
  const float one_plus_u = bits_float(0x3F800040u | (r << 7));
  const float u_gap = poly_step(one_plus_u, gap, -gap);  // exact
  const float threshold = y_abs >= 65504.0f ? 15.99609375f : u_gap;  // 16 - 2^-8
  return threshold < beyond ? 1u : 0u;
}

__device__ __forceinline__ uint32_t f16_stochastic_pair(float y0, float y1, uint32_t r0,
                                                        uint32_t r1) {
  const uint32_t toward = f16_toward_zero_pair(y0, y1);
  // + 1 in a half never carries into the other: |toward| <= 0x7C00 (inf steps never)
  return toward + f16_stochastic_step(y0, toward & 0xFFFFu, r0) +
         (f16_stochastic_step(y1, toward >> 16, r1) << 16);
}

struct PassConstants {
  uint32_t seed_lo, seed_hi, next_seed_lo, next_seed_hi;
  float a, decay, b, a_next;
  int32_t multiple;  // exact perturb: steps of multiple * k
};

// Storage formats as raw bits; float32 arithmetic on every dtype.
// word(k, y, r): the k-th 32-bit word of a stored 16-byte vector of results y (rounding bits r).
struct Float32Bits {
  using Element = uint32_t;
  static constexpr int kVector = 4;  // elements per 16 bytes
  static constexpr bool kIs16Bit = false;
  __device__ static float to_float(uint32_t bits) { return bits_float(bits); }
  template <bool kStochastic>
  __device__ static uint32_t word(int k, const float (&y)[kVector], const uint32_t (&)[kVector]) {
    return float_bits(y[k]);
  }
  template <bool kStochastic>
  __device__ static uint32_t element(float y, uint32_t) { return float_bits(y); }
};

template <class Format>
struct Half16Bits {
  using Element = uint16_t;
  using StorageFormat = Format;
  static constexpr int kVector = 8;
  static constexpr bool kIs16Bit = true;
  static constexpr bool kBFloat16 = Format::kMantissaBits == 7;
  __device__ static float to_float(uint32_t bits) {
    if constexpr (!kBFloat16) return f16_to_float(bits);
    return Format::to_float(bits);
  }
  // y[2k] to the low half, y[2k + 1] to the high half; r: the 16 stochastic-rounding bits
  template <bool kStochastic>
  __device__ static uint32_t word(int k, const float (&y)[kVector], const uint32_t (&r)[kVector]) {
    return pair<kStochastic>(y[2 * k], y[2 * k + 1], r[2 * k], r[2 * k + 1]);
  }
  template <bool kStochastic>
  __device__ static uint32_t element(float y, uint32_t r) {
    return pair<kStochastic>(y, 0.0f, r, 0u) & 0xFFFFu;
  }
  template <bool kStochastic>
  __device__ static uint32_t pair(float y0, float y1, uint32_t r0, uint32_t r1) {
    if constexpr (kStochastic) {
      if constexpr (kBFloat16) return bf16_stochastic_pair(y0, y1, r0, r1);
      return f16_stochastic_pair(y0, y1, r0, r1);
    }
    if constexpr (kBFloat16) return bf16_nearest_pair(y0, y1);
    return f16_nearest_pair(y0, y1);
  }
};

// z for the kVector elements of global vector `vector` (elements kVector * vector + 0..kVector-1;
// kVector divides 128 and 8, so a vector takes one Rademacher word and one rounding call), as
// 32-bit patterns: a Gaussian z's float bits, a Rademacher z's sign bit (see times_noise).
template <int kVector, bool kGaussian, bool kFastMath>
__device__ __forceinline__ void vector_noise(uint32_t (&z)[kVector], uint64_t vector, uint32_t key,
                                             uint32_t seed_lo, uint32_t seed_hi) {
  if constexpr (kGaussian) {
    constexpr int kCalls = kVector / kGaussianPerCall;
#pragma unroll
    for (int call = 0; call < kCalls; ++call) {
      const uint64_t group = vector * kCalls + call;
      const PhiloxWords w = philox_group(static_cast<uint32_t>(group),
                                         static_cast<uint32_t>(group >> 32), key,
                                         kStreamGaussian, seed_lo, seed_hi);
      float v[4];
      gaussian4<kFastMath>(w, v[0], v[1], v[2], v[3]);
#pragma unroll
      for (int i = 0; i < 4; ++i) z[4 * call + i] = float_bits(v[i]);
    }
  } else {
    constexpr uint64_t kPerCall = kRademacherPerCall / kVector;  // vectors per Philox call
    const uint64_t group = vector / kPerCall;
    const PhiloxWords w = philox_group(static_cast<uint32_t>(group),
                                       static_cast<uint32_t>(group >> 32), key,
                                       kStreamRademacher, seed_lo, seed_hi);
    const int within = static_cast<int>(vector % kPerCall) * kVector;  // element in the call
    const uint32_t bits = word_at(w, within / 32) >> (within % 32);  // bit j: element j
#pragma unroll
    for (int j = 0; j < kVector; ++j) z[j] = rademacher_sign(bits, j);
  }
}

// c * z for a z of vector_noise.
template <bool kGaussian>
__device__ __forceinline__ float times_noise(float c, uint32_t z) {
  if constexpr (kGaussian) return mul_rn(c, bits_float(z));
  return times_sign(c, z);
}

template <bool kGaussian>
__device__ __forceinline__ float noise_value(uint32_t z) {
  if constexpr (kGaussian) return bits_float(z);
  return times_sign(1.0f, z);
}

template <int kVector>
__device__ __forceinline__ void vector_rounding(uint32_t (&r)[kVector], uint64_t vector,
                                                uint32_t key, uint32_t seed_lo, uint32_t seed_hi) {
  static_assert(kVector <= kRoundingPerCall, "one rounding call per vector");
  constexpr uint64_t kPerCall = kRoundingPerCall / kVector;  // vectors per Philox call
  const uint64_t group = vector / kPerCall;
  const PhiloxWords w = philox_group(static_cast<uint32_t>(group),
                                     static_cast<uint32_t>(group >> 32), key, kStreamRounding,
                                     seed_lo, seed_hi);
  const int within = static_cast<int>(vector % kPerCall) * kVector;  // 0 for 16-bit vectors
#pragma unroll
  for (int j = 0; j < kVector; ++j) r[j] = rounding_half(w, within + j);
}

// The float32 result of one element before it is stored.
template <class Storage, bool kGaussian, bool kUpdate, bool kNext>
__device__ __forceinline__ float element_value(uint32_t bits, uint32_t z, uint32_t z_next,
                                               const PassConstants& c) {
  const float theta = Storage::to_float(bits);
  const float a_z = times_noise<kGaussian>(c.a, z);
  float y = kUpdate ? restored_and_updated_by(theta, a_z, c.decay, times_noise<kGaussian>(c.b, z))
                    : perturbed_by(theta, a_z);
  if (kNext) y = perturbed_by(y, times_noise<kGaussian>(c.a_next, z_next));
  return y;
}

// Exact mode (16-bit only): integer steps on the tensor's grid g (noise_contract.h).
template <class Storage, bool kGaussian, bool kUpdate, bool kStochastic, bool kNext>
__device__ __forceinline__ uint32_t exact_element_result(uint32_t bits, uint32_t z, uint32_t r,
                                                         uint32_t z_next, const PassConstants& c,
                                                         const Grid& g, float a_q, float a_next_q) {
  if (kUpdate) {
    return exact_restored_and_updated<typename Storage::StorageFormat, kStochastic, kNext>(
        bits, a_q, c.decay, c.b, noise_value<kGaussian>(z), rounding_uniform(r), a_next_q,
        noise_value<kGaussian>(z_next), g);
  }
  return exact_perturbed(bits, a_q, c.multiple, noise_value<kGaussian>(z), g);
}

// perturb:                 theta <- store(theta + a z)
// update:                  theta <- store((theta + a z) decay - b z)
// update, next:            theta <- store((theta + a z) decay - b z + a_next z(next seed))
// store: round to nearest even, or (kStochastic, 16-bit) the contract's stochastic rounding.
// kExact (16-bit only): the exact passes; the table has a sixth column, the quantum's exponent.
// kFastMath (Gaussian, not exact): hardware sine, cosine and square root (docs/noise.md).
// Registers: at most 64 per thread (4 blocks of 256 threads per SM), the fused step 80 (3),
// exact mode 128 (2); left alone, ptxas took up to 128 for passes that need 64.
template <class Storage, bool kGaussian, bool kUpdate, bool kStochastic, bool kNext,
          bool kExact = false, bool kFastMath = false>
__global__ void __launch_bounds__(kThreads, kExact ? 2 : kNext ? 3 : 4)
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
    // global vector index of the tensor's first vector (vectors start on multiples of kVector)
    const uint64_t first_global = static_cast<uint64_t>(offset) / kVector;
    for (; v < n_vectors; v += stride) {
      const uint64_t vector = first_global + static_cast<uint64_t>(v);
      const int64_t local = v * kVector - lead;  // negative for a partial first vector
      uint32_t z[kVector], z_next[kVector], r[kVector];
      vector_noise<kVector, kGaussian, kFastMath>(z, vector, key, c.seed_lo, c.seed_hi);
      if (kNext) {
        vector_noise<kVector, kGaussian, kFastMath>(z_next, vector, key, c.next_seed_lo,
                                                    c.next_seed_hi);
      }
      if (kStochastic) vector_rounding<kVector>(r, vector, key, c.seed_lo, c.seed_hi);
      const bool whole = local >= 0 && local + kVector <= numel &&
                         reinterpret_cast<uintptr_t>(data + local) % 16 == 0;
      if (whole) {
        uint4* address = reinterpret_cast<uint4*>(data + local);
        const uint4 raw = *address;
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        uint32_t out[4] = {0u, 0u, 0u, 0u};
        if constexpr (kExact) {
#pragma unroll
          for (int j = 0; j < kVector; ++j) {
            const int shift = 16 * (j % kPerWord);
            const uint32_t bits = (words[j / kPerWord] >> shift) & kMask;
            out[j / kPerWord] |= exact_element_result<Storage, kGaussian, kUpdate, kStochastic,
                                                      kNext>(bits, z[j], r[j], z_next[j], c,
                                                             grid, a_q, a_next_q) << shift;
          }
        } else {
          float y[kVector];
#pragma unroll
          for (int j = 0; j < kVector; ++j) {
            const uint32_t bits = (words[j / kPerWord] >> (16 * (j % kPerWord))) & kMask;
            y[j] = element_value<Storage, kGaussian, kUpdate, kNext>(bits, z[j], z_next[j], c);
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = Storage::template word<kStochastic>(k, y, r);
        }
        *address = make_uint4(out[0], out[1], out[2], out[3]);
      } else {
#pragma unroll
        for (int j = 0; j < kVector; ++j) {
          const int64_t i = local + j;
          if (i < 0 || i >= numel) continue;
          if constexpr (kExact) {
            data[i] = static_cast<Element>(
                exact_element_result<Storage, kGaussian, kUpdate, kStochastic, kNext>(
                    data[i], z[j], r[j], z_next[j], c, grid, a_q, a_next_q));
          } else {
            const float y = element_value<Storage, kGaussian, kUpdate, kNext>(data[i], z[j],
                                                                              z_next[j], c);
            data[i] = static_cast<Element>(Storage::template element<kStochastic>(y, r[j]));
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

template <class Storage, bool kGaussian, bool kStochastic, bool kFastMath>
KernelFunction pick_update(bool next) {
  return next ? &_zo_pass_kernel<Storage, kGaussian, true, kStochastic, true, false, kFastMath>
              : &_zo_pass_kernel<Storage, kGaussian, true, kStochastic, false, false, kFastMath>;
}

template <class Storage, bool kGaussian, bool kFastMath>
KernelFunction pick_pass(bool update, bool stochastic, bool next) {
  if (!update) return &_zo_pass_kernel<Storage, kGaussian, false, false, false, false, kFastMath>;
  if constexpr (Storage::kIs16Bit) {
    if (stochastic) return pick_update<Storage, kGaussian, true, kFastMath>(next);
  }
  return pick_update<Storage, kGaussian, false, kFastMath>(next);  // float32: no rounding
}

template <class Storage>
KernelFunction pick_distribution(bool gaussian, bool update, bool stochastic, bool next,
                                 bool fast_math) {
  if (!gaussian) return pick_pass<Storage, false, false>(update, stochastic, next);
  return fast_math ? pick_pass<Storage, true, true>(update, stochastic, next)
                   : pick_pass<Storage, true, false>(update, stochastic, next);
}

// The kernel instantiation for one launch (fast_math: Gaussian passes only).
inline KernelFunction pick_kernel(int storage, bool gaussian, bool update, bool stochastic,
                                  bool next, bool fast_math) {
  switch (storage) {
    case kFloat32:
      return pick_distribution<Float32Bits>(gaussian, update, stochastic, next, fast_math);
    case kBFloat16:
      return pick_distribution<Half16Bits<BFloat16Format>>(gaussian, update, stochastic, next,
                                                           fast_math);
    case kFloat16:
      return pick_distribution<Half16Bits<Float16Format>>(gaussian, update, stochastic, next,
                                                          fast_math);
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
