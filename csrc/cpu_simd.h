// The CPU kernels' inner loops, free of torch: one block of noise (Philox4x32-10, Box-Muller,
// Rademacher signs, stochastic-rounding values) and one block of a pass over the weights, in
// several variants of the same arithmetic:
//
//   "scalar"  the contract's per-element code of noise_contract.h (the reference);
//   "avx512"  16 lanes, x86-64 with AVX-512 F/BW/DQ/VL;
//   "avx2"    8 lanes, x86-64 with AVX2, FMA and F16C;
//   "neon"    4 lanes, aarch64.
//
// The vector variants run the contract's operations in the same order with the same float32
// roundings (IEEE sqrt, division and conversions; the passes' arithmetic never contracted), lanes
// over consecutive Philox counter groups, so they give the scalar variant's bits exactly: Philox
// words, Rademacher signs, stochastic-rounding values, and every stored weight for the same z.
// The one difference is in the Box-Muller polynomials, whose steps (poly_step of noise_contract.h)
// the vector variants fuse into FMAs, as the CUDA and Triton kernels do, and the portable scalar
// code does not: their Gaussian z (identical among the vector variants) differ from the scalar
// variant's by a few float32 ulps, all within the bound stated in docs/native.md. A torch-free
// header so that tests/native/simd_check.cpp can compile it for another architecture (aarch64
// under qemu) and compare every variant with the scalar one.
//
// The vector variants need GCC (vector extensions, __builtin_shuffle, #pragma GCC target); other
// compilers get the scalar variant only.
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#include "noise_contract.h"

#if defined(__GNUC__) && !defined(__clang__) && !defined(FASTZO_NO_SIMD)
#if defined(__x86_64__)
#include <immintrin.h>
#define FASTZO_SIMD_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define FASTZO_SIMD_NEON 1
#endif
#endif

#if defined(__GNUC__)
#define FASTZO_INLINE inline __attribute__((always_inline))
#define FASTZO_RESTRICT __restrict__
#else
#define FASTZO_INLINE inline
#define FASTZO_RESTRICT
#endif

namespace fastzo {
namespace cpu {

using namespace contract;

// Noise is generated kBlock elements at a time into buffers that stay in L1.
constexpr int64_t kBlock = 1024;
static_assert(kBlock % kRademacherPerCall == 0, "a block must hold whole Philox groups");

enum class StorageKind { kFloat32, kBFloat16, kFloat16 };

// What the apply loop does with an element: perturb, or update (optionally rounding
// stochastically, optionally fused with the next step's perturbation).
struct PassKind {
  bool update, stochastic, next;
};

struct ApplyArgs {
  void* data;            // first element to write
  const float* z;        // its z
  const uint16_t* r;     // its stochastic-rounding bits (stochastic only)
  const float* z_next;   // its z for the next seed (next only)
  int64_t count;
  float a, decay, b, a_next;
};

// One variant: noise for the block [block_start, block_start + kBlock) (block_start a multiple
// of kBlock), and a pass over up to kBlock elements.
struct Variant {
  const char* name;
  void (*gaussian_block)(float* z, uint64_t block_start, uint32_t key, uint32_t seed_lo,
                         uint32_t seed_hi);
  void (*rademacher_block)(float* z, uint64_t block_start, uint32_t key, uint32_t seed_lo,
                           uint32_t seed_hi);
  void (*rounding_block)(uint16_t* r, uint64_t block_start, uint32_t key, uint32_t seed_lo,
                         uint32_t seed_hi);
  void (*apply_block)(StorageKind storage, PassKind pass, const ApplyArgs& args);
  // Box-Muller alone on given Philox words (tests): z[4 j + 0..3] from x0..x3[j].
  void (*gaussian_words)(const uint32_t* x0, const uint32_t* x1, const uint32_t* x2,
                         const uint32_t* x3, float* z, int64_t groups);
};

// ---------------------------------------------------------------------------------------------
// Storage formats of the per-element code: float32 arithmetic on every dtype, 16-bit values
// handled as raw bits.

struct Float32Storage {
  using Element = float;
  using Format = void;
  static FASTZO_INLINE float load(float v) { return v; }
  static FASTZO_INLINE float store_nearest(float y) { return y; }
  static FASTZO_INLINE float store_stochastic(float y, float) { return y; }
};

template <class F>
struct HalfStorage {
  using Element = uint16_t;
  using Format = F;
  static FASTZO_INLINE float load(uint16_t v) { return F::to_float(v); }
  static FASTZO_INLINE uint16_t store_nearest(float y) {
    return static_cast<uint16_t>(F::round_nearest(y));
  }
  static FASTZO_INLINE uint16_t store_stochastic(float y, float u) {
    return static_cast<uint16_t>(round_stochastic<F>(y, u));
  }
};

// Element i of a pass, per element: the reference, and the vector variants' tail.
template <class Storage, bool kUpdate, bool kStochastic, bool kNext>
FASTZO_INLINE void apply_one(const ApplyArgs& args, int64_t i) {
  auto* theta = static_cast<typename Storage::Element*>(args.data);
  const float value = Storage::load(theta[i]);
  float y = kUpdate ? restored_and_updated(value, args.a, args.decay, args.b, args.z[i])
                    : perturbed(value, args.a, args.z[i]);
  if (kNext) y = updated_and_perturbed(y, args.a_next, args.z_next[i]);
  theta[i] = kStochastic ? Storage::store_stochastic(y, rounding_uniform(args.r[i])) : Storage::store_nearest(y);
}

// Calls Body::template run<Storage, kUpdate, kStochastic, kNext>(args) for a pass. A macro, not
// a template: each variant expands it inside its own instruction-set region.
#define FASTZO_DISPATCH_APPLY(Body, storage, pass, args)                                        \
  do {                                                                                         \
    switch (storage) {                                                                         \
      case StorageKind::kFloat32: /* float32 results are exact: nothing to round */            \
        if (!(pass).update) return Body::run<Float32Storage, false, false, false>(args);       \
        return (pass).next ? Body::run<Float32Storage, true, false, true>(args)                \
                           : Body::run<Float32Storage, true, false, false>(args);              \
      case StorageKind::kBFloat16:                                                             \
        FASTZO_DISPATCH_UPDATE(Body, HalfStorage<BFloat16Format>, pass, args);                 \
      case StorageKind::kFloat16:                                                              \
        FASTZO_DISPATCH_UPDATE(Body, HalfStorage<Float16Format>, pass, args);                  \
    }                                                                                          \
  } while (0)

#define FASTZO_DISPATCH_UPDATE(Body, Storage, pass, args)                                       \
  do {                                                                                         \
    if (!(pass).update) return Body::run<Storage, false, false, false>(args);                  \
    if ((pass).stochastic) {                                                                   \
      return (pass).next ? Body::run<Storage, true, true, true>(args)                          \
                         : Body::run<Storage, true, true, false>(args);                        \
    }                                                                                          \
    return (pass).next ? Body::run<Storage, true, false, true>(args)                           \
                       : Body::run<Storage, true, false, false>(args);                         \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The scalar variant: the contract's per-element code. Group indices inside a block never cross
// a 2^32 boundary (kBlock / 4 divides 2^32), so the counter's high word is constant.

namespace scalar {

static void gaussian_block(float* FASTZO_RESTRICT z, uint64_t block_start, uint32_t key,
                           uint32_t seed_lo, uint32_t seed_hi) {
  const uint64_t first_group = block_start / kGaussianPerCall;
  const uint32_t group_lo = static_cast<uint32_t>(first_group);
  const uint32_t group_hi = static_cast<uint32_t>(first_group >> 32);
  for (int g = 0; g < kBlock / kGaussianPerCall; ++g) {
    const PhiloxWords w =
        philox_group(group_lo + g, group_hi, key, kStreamGaussian, seed_lo, seed_hi);
    gaussian4(w, z[4 * g + 0], z[4 * g + 1], z[4 * g + 2], z[4 * g + 3]);
  }
}

static void rademacher_block(float* FASTZO_RESTRICT z, uint64_t block_start, uint32_t key,
                             uint32_t seed_lo, uint32_t seed_hi) {
  const uint64_t first_group = block_start / kRademacherPerCall;
  const uint32_t group_lo = static_cast<uint32_t>(first_group);
  const uint32_t group_hi = static_cast<uint32_t>(first_group >> 32);
  for (int g = 0; g < kBlock / kRademacherPerCall; ++g) {
    const PhiloxWords w =
        philox_group(group_lo + g, group_hi, key, kStreamRademacher, seed_lo, seed_hi);
    for (int word = 0; word < 4; ++word) {
      const uint32_t bits = word_at(w, word);
      float* out = z + kRademacherPerCall * g + 32 * word;
      for (int bit = 0; bit < 32; ++bit) out[bit] = rademacher(bits, bit);
    }
  }
}

// The stochastic-rounding bits r of one block (the comparison value is (r + 1/2) 2^-16).
static void rounding_block(uint16_t* FASTZO_RESTRICT r, uint64_t block_start, uint32_t key,
                           uint32_t seed_lo, uint32_t seed_hi) {
  const uint64_t first_group = block_start / kRoundingPerCall;
  const uint32_t group_lo = static_cast<uint32_t>(first_group);
  const uint32_t group_hi = static_cast<uint32_t>(first_group >> 32);
  for (int g = 0; g < kBlock / kRoundingPerCall; ++g) {
    const PhiloxWords w =
        philox_group(group_lo + g, group_hi, key, kStreamRounding, seed_lo, seed_hi);
    for (int h = 0; h < kRoundingPerCall; ++h) {
      r[kRoundingPerCall * g + h] = static_cast<uint16_t>(rounding_half(w, h));
    }
  }
}

struct ApplyBody {
  template <class Storage, bool kUpdate, bool kStochastic, bool kNext>
  static FASTZO_INLINE void run(const ApplyArgs& args) {
    for (int64_t i = 0; i < args.count; ++i) apply_one<Storage, kUpdate, kStochastic, kNext>(args, i);
  }
};

static void apply_block(StorageKind storage, PassKind pass, const ApplyArgs& args) {
  FASTZO_DISPATCH_APPLY(ApplyBody, storage, pass, args);
}

static void gaussian_words(const uint32_t* x0, const uint32_t* x1, const uint32_t* x2,
                           const uint32_t* x3, float* z, int64_t groups) {
  for (int64_t j = 0; j < groups; ++j) {
    gaussian4(PhiloxWords{x0[j], x1[j], x2[j], x3[j]}, z[4 * j], z[4 * j + 1], z[4 * j + 2],
              z[4 * j + 3]);
  }
}

}  // namespace scalar

// ---------------------------------------------------------------------------------------------
// The vector variants: cpu_simd_body.inc, compiled once per instruction set in its own
// namespace, with the lane count W and the two primitives that GCC's vector extensions do not
// provide (32x32 -> 64-bit multiply, square root) defined before it.

#if defined(FASTZO_SIMD_X86)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
// GCC 12's avx512fintrin.h reads an intentionally undefined vector in some intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
constexpr int W = 16;
typedef uint32_t U __attribute__((vector_size(64)));
typedef int32_t I __attribute__((vector_size(64)));
typedef float F __attribute__((vector_size(64)));
typedef uint16_t H __attribute__((vector_size(32)));
constexpr const char* kName = "avx512";

// Philox4x32-10 on 16 lanes. vpmuludq multiplies the low words of the 64-bit lanes and leaves
// each product's high word in the high place, so the state is kept as two vectors: "even" holds
// the even lanes (in the low words of its 64-bit lanes), "odd" the odd lanes swapped into the low
// words once at the start; the high words of both are don't-care until the two are merged at the
// end. Per round and 16 lanes that is 4 multiplies, 4 in-lane swaps (each product's high word
// down into the low place) and 4 three-way XORs (vpternlogd): 12 instructions, the limit of two
// vector ports, against 16 when both words of every product are put back in place each round
// (stochastic-rounding bits, block function alone: 0.20 -> 0.18 ns per element).
static FASTZO_INLINE void philox10(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  __m512i e0 = (__m512i)c0, e1 = (__m512i)c1, e2 = (__m512i)c2, e3 = (__m512i)c3;
  __m512i o0 = _mm512_shuffle_epi32(e0, _MM_PERM_CDAB);
  __m512i o1 = _mm512_shuffle_epi32(e1, _MM_PERM_CDAB);
  __m512i o2 = _mm512_shuffle_epi32(e2, _MM_PERM_CDAB);
  __m512i o3 = _mm512_shuffle_epi32(e3, _MM_PERM_CDAB);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0 + round * kPhiloxW0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1 + round * kPhiloxW1));
    const __m512i even0 = _mm512_mul_epu32(e0, m0), even1 = _mm512_mul_epu32(e2, m1);
    const __m512i odd0 = _mm512_mul_epu32(o0, m0), odd1 = _mm512_mul_epu32(o2, m1);
    // c0 = hi1 ^ c1 ^ k0, c2 = hi0 ^ c3 ^ k1 (0x96: a ^ b ^ c); c1 = lo1, c3 = lo0
    e0 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(even1, _MM_PERM_CDAB), e1, key0, 0x96);
    e2 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(even0, _MM_PERM_CDAB), e3, key1, 0x96);
    o0 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(odd1, _MM_PERM_CDAB), o1, key0, 0x96);
    o2 = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(odd0, _MM_PERM_CDAB), o3, key1, 0x96);
    e1 = even1;
    e3 = even0;
    o1 = odd1;
    o3 = odd0;
  }
  c0 = (U)_mm512_mask_shuffle_epi32(e0, 0xAAAA, o0, _MM_PERM_CDAB);
  c1 = (U)_mm512_mask_shuffle_epi32(e1, 0xAAAA, o1, _MM_PERM_CDAB);
  c2 = (U)_mm512_mask_shuffle_epi32(e2, 0xAAAA, o2, _MM_PERM_CDAB);
  c3 = (U)_mm512_mask_shuffle_epi32(e3, 0xAAAA, o3, _MM_PERM_CDAB);
}

static FASTZO_INLINE F sqrt_v(F x) { return (F)_mm512_sqrt_ps((__m512)x); }
static FASTZO_INLINE F fma_v(F a, F b, F c) {
  return (F)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
// Tests for the rare special cases, straight from the comparison masks.
static FASTZO_INLINE bool any_above(U x, uint32_t limit) {
  return _mm512_cmpgt_epu32_mask((__m512i)x, _mm512_set1_epi32(static_cast<int>(limit))) != 0;
}
static FASTZO_INLINE bool any_nan(F y) {
  return _mm512_cmp_ps_mask((__m512)y, (__m512)y, _CMP_UNORD_Q) != 0;
}
// 16-bit patterns <-> uint32 lanes (zero-extended / truncated).
static FASTZO_INLINE U widen(H h) { return (U)_mm512_cvtepu16_epi32((__m256i)h); }
static FASTZO_INLINE H narrow(U x) { return (H)_mm512_cvtepi32_epi16((__m512i)x); }

// IEEE float16 <-> float32 conversions (exact; round to nearest even), as c10's.
static FASTZO_INLINE F half_to_float_h(H h) { return (F)_mm512_cvtph_ps((__m256i)h); }
static FASTZO_INLINE H float_to_half_h(F y) {
  return (H)_mm512_cvtps_ph((__m512)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

#define FASTZO_VARIANT_PHILOX10 1
#include "cpu_simd_body.inc"
#undef FASTZO_VARIANT_PHILOX10
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
namespace avx2 {
constexpr int W = 8;
typedef uint32_t U __attribute__((vector_size(32)));
typedef int32_t I __attribute__((vector_size(32)));
typedef float F __attribute__((vector_size(32)));
typedef uint16_t H __attribute__((vector_size(16)));
constexpr const char* kName = "avx2";

static FASTZO_INLINE void mulhilo(U a, uint32_t b, U& hi, U& lo) {
  const __m256i va = (__m256i)a;
  const __m256i vb = _mm256_set1_epi32(static_cast<int>(b));
  const __m256i even = _mm256_mul_epu32(va, vb);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), vb);
  hi = (U)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = (U)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

static FASTZO_INLINE F sqrt_v(F x) { return (F)_mm256_sqrt_ps((__m256)x); }
static FASTZO_INLINE F fma_v(F a, F b, F c) {
  return (F)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
static FASTZO_INLINE bool any_above(U x, uint32_t limit) {
  const I above = (I)(x ^ 0x80000000u) > static_cast<int32_t>(limit ^ 0x80000000u);
  return !_mm256_testz_si256((__m256i)above, (__m256i)above);
}
static FASTZO_INLINE bool any_nan(F y) {
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)y, (__m256)y, _CMP_UNORD_Q)) != 0;
}
static FASTZO_INLINE U widen(H h) { return (U)_mm256_cvtepu16_epi32((__m128i)h); }
static FASTZO_INLINE H narrow(U x) {  // values below 2^16: unsigned saturation keeps them
  const __m128i lo = _mm256_castsi256_si128((__m256i)x);
  const __m128i hi = _mm256_extracti128_si256((__m256i)x, 1);
  return (H)_mm_packus_epi32(lo, hi);
}

static FASTZO_INLINE F half_to_float_h(H h) { return (F)_mm256_cvtph_ps((__m128i)h); }
static FASTZO_INLINE H float_to_half_h(F y) {
  return (H)_mm256_cvtps_ph((__m256)y, _MM_FROUND_TO_NEAREST_INT);
}

#include "cpu_simd_body.inc"
}  // namespace avx2
#pragma GCC pop_options

#elif defined(FASTZO_SIMD_NEON)

namespace neon {
constexpr int W = 4;
typedef uint32_t U __attribute__((vector_size(16)));
typedef int32_t I __attribute__((vector_size(16)));
typedef float F __attribute__((vector_size(16)));
typedef uint16_t H __attribute__((vector_size(8)));
constexpr const char* kName = "neon";

static FASTZO_INLINE void mulhilo(U a, uint32_t b, U& hi, U& lo) {
  const uint32x4_t va = (uint32x4_t)a;
  const uint32x4_t vb = vdupq_n_u32(b);
  const uint32x4_t low = vreinterpretq_u32_u64(vmull_u32(vget_low_u32(va), vget_low_u32(vb)));
  const uint32x4_t high = vreinterpretq_u32_u64(vmull_high_u32(va, vb));
  hi = (U)vuzp2q_u32(low, high);
  lo = (U)vuzp1q_u32(low, high);
}

static FASTZO_INLINE F sqrt_v(F x) { return (F)vsqrtq_f32((float32x4_t)x); }
static FASTZO_INLINE F fma_v(F a, F b, F c) {
  return (F)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
}
static FASTZO_INLINE bool any_above(U x, uint32_t limit) {
  return vmaxvq_u32((uint32x4_t)x) > limit;
}
static FASTZO_INLINE bool any_nan(F y) {
  return vminvq_u32(vceqq_f32((float32x4_t)y, (float32x4_t)y)) == 0;
}
static FASTZO_INLINE U widen(H h) { return (U)vmovl_u16((uint16x4_t)h); }
static FASTZO_INLINE H narrow(U x) { return (H)vmovn_u32((uint32x4_t)x); }

static FASTZO_INLINE F half_to_float_h(H h) {
  return (F)vcvt_f32_f16(vreinterpret_f16_u16((uint16x4_t)h));
}
static FASTZO_INLINE H float_to_half_h(F y) {
  return (H)vreinterpret_u16_f16(vcvt_f16_f32((float32x4_t)y));  // FPCR: round to nearest even
}

#include "cpu_simd_body.inc"
}  // namespace neon

#endif

// ---------------------------------------------------------------------------------------------
// The variants this build has, best first, and whether this CPU can run each.

static const Variant kVariants[] = {
#if defined(FASTZO_SIMD_X86)
    {avx512::kName, avx512::gaussian_block, avx512::rademacher_block, avx512::rounding_block,
     avx512::apply_block, avx512::gaussian_words},
    {avx2::kName, avx2::gaussian_block, avx2::rademacher_block, avx2::rounding_block,
     avx2::apply_block, avx2::gaussian_words},
#elif defined(FASTZO_SIMD_NEON)
    {neon::kName, neon::gaussian_block, neon::rademacher_block, neon::rounding_block,
     neon::apply_block, neon::gaussian_words},
#endif
    {"scalar", scalar::gaussian_block, scalar::rademacher_block, scalar::rounding_block,
     scalar::apply_block, scalar::gaussian_words},
};
constexpr int kVariantCount = sizeof(kVariants) / sizeof(kVariants[0]);

static inline bool cpu_can_run(const Variant& v) {
#if defined(FASTZO_SIMD_X86)
  __builtin_cpu_init();
  if (strcmp(v.name, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
  if (strcmp(v.name, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("fma");
  }
#endif
  (void)v;
  return true;  // scalar; NEON is part of every aarch64 CPU
}

// The variant called `name` in this build, or nullptr.
static inline const Variant* find_variant(const char* name) {
  for (const Variant& v : kVariants) {
    if (strcmp(v.name, name) == 0) return &v;
  }
  return nullptr;
}

// The first (widest) variant this CPU can run.
static inline const Variant* best_variant() {
  for (const Variant& v : kVariants) {
    if (cpu_can_run(v)) return &v;
  }
  return &kVariants[kVariantCount - 1];
}

}  // namespace cpu
}  // namespace fastzo
