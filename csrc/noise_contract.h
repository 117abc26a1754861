// The fastzo noise contract (docs/noise.md) for C++ and CUDA: one definition, compiled for the
// host (backend "cpp") and for the device (backend "cuda"), so the two cannot drift.
//
// Bit-exact parts: Philox4x32-10, the counter layout, Rademacher bits, stochastic-rounding bits,
// the 16-bit stores (round to nearest even, and the contract's stochastic rounding).
// Approximate part: the Box-Muller transform, evaluated in float32 with branch-free polynomials
// (a few float32 ulp; the contract allows |dz| <= 2e-5 against the float64 oracle). They are
// written without branches or library calls so that a CPU loop over them vectorises.
//
// Everything here has internal linkage (static): the CPU kernels are compiled once per
// instruction set and must never share an out-of-line copy across those builds.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FASTZO_HD static __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTZO_HD static inline __attribute__((always_inline))
#else
#define FASTZO_HD static inline
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

namespace fastzo {
namespace contract {

// Bumped whenever the kernels' semantics change; the Python side refuses a stale build.
constexpr int kAbiVersion = 7;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

constexpr uint32_t kStreamGaussian = 0;
constexpr uint32_t kStreamRademacher = 1;
constexpr uint32_t kStreamRounding = 2;

constexpr int kGaussianPerCall = 4;
constexpr int kRademacherPerCall = 128;
constexpr int kRoundingPerCall = 8;

// ---------------------------------------------------------------------------------------------
// Float arithmetic that the compiler may not contract into FMAs: the update
// (theta + a*z)*decay - b*z must round like the oracle's separate operations. The host
// translation unit is compiled with -ffp-contract=off; the device uses the _rn intrinsics,
// which nvcc never fuses.

FASTZO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FASTZO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FASTZO_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Polynomial steps of the Box-Muller transform, acc * x + c: a fused multiply-add (one
// rounding) on the device, and likewise in the CPU vector variants (cpu_simd.h), the CUDA
// kernel's CPU emulation (FASTZO_FUSED_POLY_STEPS) and the Triton kernel, which all evaluate the
// same expressions and so give the same z. The portable host code (the scalar CPU variant) uses a
// multiply and an add: an FMA there would need the FMA instruction set, or a slow libm call. The
// two differ by a few float32 ulps of z, far inside the contract's tolerance.
FASTZO_HD float poly_step(float acc, float x, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(acc, x, c);
#elif defined(FASTZO_FUSED_POLY_STEPS)
  return __builtin_fmaf(acc, x, c);
#else
  return acc * x + c;
#endif
}

FASTZO_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FASTZO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FASTZO_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);  // one instruction with -fno-math-errno
#endif
}

FASTZO_HD float abs_f(float x) { return bits_float(float_bits(x) & 0x7FFFFFFFu); }

FASTZO_HD bool is_finite_f(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

FASTZO_HD bool is_nan_f(float x) { return (float_bits(x) & 0x7FFFFFFFu) > 0x7F800000u; }

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Random123): counter (c0..c3) in, output words out, in place.

FASTZO_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

FASTZO_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                             uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Counter layout: (group low word, group high word, tensor key, stream); key = (seed lo, seed hi).
struct PhiloxWords {
  uint32_t x0, x1, x2, x3;
};

FASTZO_HD PhiloxWords philox_group(uint32_t group_lo, uint32_t group_hi, uint32_t tensor_key,
                                   uint32_t stream, uint32_t seed_lo, uint32_t seed_hi) {
  uint32_t c0 = group_lo, c1 = group_hi, c2 = tensor_key, c3 = stream;
  philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi);
  return PhiloxWords{c0, c1, c2, c3};
}

FASTZO_HD uint32_t word_at(const PhiloxWords& w, int index) {
  // three selects, no branches (a GPU thread picks its word by a computed index)
  const uint32_t even = (index & 1) ? w.x1 : w.x0;
  const uint32_t odd = (index & 1) ? w.x3 : w.x2;
  return (index & 2) ? odd : even;
}

// ---------------------------------------------------------------------------------------------
// uint32 -> uniform: u(x) = ((x >> 8) + 0.5) 2^-24 in [2^-25, 1 - 2^-25]. The Gaussian
// transform below never forms u as a float: it works on the integer x >> 8, exactly.

// ln u(x), accurate to about 1 ulp over the whole range. u = n 2^-25 with n = 2(x >> 8) + 1 odd
// and below 2^25, which float32 cannot hold for u >= 1/2 (rounding u there would lose up to
// 2^-25 and wreck ln u near 1, where |z| is small but the contract still asks 2e-5). So the
// Cephes logf reduction is done on the integer: n = 2^e (1 + f) with 1 + f in about
// [sqrt(1/2), sqrt(2)) and f exact in float32; then ln u = log1p(f) + (e - 25) ln 2 with
// Cephes' degree-9 polynomial and ln 2 split in two parts. No branches.
FASTZO_HD float log_uniform24(uint32_t x) {
  const int32_t k = static_cast<int32_t>(x >> 8);
  const int32_t n = 2 * k + 1;
  // float(n) may round; it only picks the exponent. 0x3F3504F3 is sqrt(1/2).
  const int32_t e = static_cast<int32_t>(float_bits(static_cast<float>(n)) - 0x3F3504F3u) >> 23;
  const float inv_pow2 = bits_float(static_cast<uint32_t>(127 - e) << 23);  // 2^-e
  // f = n 2^-e - 1 = (2k 2^-e - 1) + 2^-e: each step is exact (an exact product, then Sterbenz,
  // then a representable sum), and no per-lane variable shift is needed.
  const float f = poly_step(static_cast<float>(k), 2.0f * inv_pow2, -1.0f) + inv_pow2;
  const float exponent = static_cast<float>(e - 25);
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = poly_step(p, f, -1.1514610310e-1f);
  p = poly_step(p, f, 1.1676998740e-1f);
  p = poly_step(p, f, -1.2420140846e-1f);
  p = poly_step(p, f, 1.4249322787e-1f);
  p = poly_step(p, f, -1.6668057665e-1f);
  p = poly_step(p, f, 2.0000714765e-1f);
  p = poly_step(p, f, -2.4999993993e-1f);
  p = poly_step(p, f, 3.3333331174e-1f);
  float y = poly_step(exponent, -2.12194440e-4f, p * f * f2);
  y = poly_step(f2, -0.5f, y);
  return poly_step(exponent, 0.693359375f, f + y);
}

// fl32(pi/2) 2^-22: the reduced angle per unit of rem below (exact).
constexpr float kQuarterTurnStep = 1.5707963267948966f * 2.384185791015625e-07f;

// sin and cos of 2*pi*u(x). The quarter-turn reduction is done on the
// 24-bit integer, so it is exact: 2*pi*u = (q + r) * pi/2 with q integer, r in [-1/2, 1/2).
// Then Cephes sinf/cosf polynomials on [-pi/4, pi/4] (about 1 ulp).
FASTZO_HD void sincos_2pi_uniform24(uint32_t x, float& sin_out, float& cos_out) {
  const int32_t k = static_cast<int32_t>(x >> 8);    // u = (k + 1/2) 2^-24, 4u = (k + 1/2) 2^-22
  const int32_t q = (k + (1 << 21)) >> 22;            // nearest quarter turn, 0..4 (never a tie)
  const int32_t rem = k - (q << 22);                  // in [-2^21, 2^21)
  // a = (rem + 1/2) 2^-22 fl(pi/2), rounded once: (rem + 1/2) 2^-22 is exact. The device takes
  // the same bits from one fused multiply-add: rem * (pi/2 2^-22) + pi/2 2^-23.
#if defined(__CUDA_ARCH__)
  const float a = __fmaf_rn(static_cast<float>(rem), 1.5707963267948966f * 2.384185791015625e-07f,
                            1.5707963267948966f * 1.1920928955078125e-07f);
#else
  const float r = (static_cast<float>(rem) + 0.5f) * 2.384185791015625e-07f;  // exact, * 2^-22
  const float a = r * 1.5707963267948966f;
#endif
  const float a2 = a * a;
  float s = -1.9515295891e-4f;
  s = poly_step(s, a2, 8.3321608736e-3f);
  s = poly_step(s, a2, -1.6666654611e-1f);
  s = poly_step(s * a2, a, a);
  float c = 2.443315711809948e-5f;
  c = poly_step(c, a2, -1.388731625493765e-3f);
  c = poly_step(c, a2, 4.166664568298827e-2f);
  c = poly_step(c * a2, a2, poly_step(a2, -0.5f, 1.0f));
  // sin(q*pi/2 + a), cos(q*pi/2 + a): swap on odd quadrants, then fix the signs.
  const bool odd = (q & 1) != 0;
  const float sin_base = odd ? c : s;
  const float cos_base = odd ? s : c;
  sin_out = bits_float(float_bits(sin_base) ^ (static_cast<uint32_t>(q & 2) << 30));
  cos_out = bits_float(float_bits(cos_base) ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// Fast math (GPU kernels; docs/noise.md, "Fast math"): sin and cos of 2*pi*u(x) from the
// hardware's sin.approx / cos.approx on the angle reduced exactly to [-pi, pi]: rem, the low 24
// bits of x >> 8 taken as signed, is u - round(u) in units of 2^-24, and
// (rem + 1/2) 2 pi 2^-24 is rounded once (rem + 1/2 is exact). On the host (the emulation of
// the CUDA kernel) the accurate sinf/cosf of the same angle, as the Triton interpreter does.
FASTZO_HD void sincos_2pi_uniform24_fast(uint32_t x, float& sin_out, float& cos_out) {
  const int32_t rem = static_cast<int32_t>(x) >> 8;
#if defined(__CUDA_ARCH__)
  const float angle = __fmaf_rn(static_cast<float>(rem), 3.7450702829239286e-07f,
                                1.8725351414619643e-07f);
  sin_out = __sinf(angle);
  cos_out = __cosf(angle);
#else
  const float angle = (static_cast<float>(rem) + 0.5f) * 3.7450702829239286e-07f;
  sin_out = sinf(angle);
  cos_out = cosf(angle);
#endif
}

// Fast math: the hardware's square root (sqrt.approx.f32, as the Triton kernel's tl.sqrt).
FASTZO_HD float sqrt_fast(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return __builtin_sqrtf(x);
#endif
}

// Box-Muller: the four Gaussian z of one Philox call, in element order 4j + 0..3 (kFastMath:
// hardware sine, cosine and square root).
template <bool kFastMath = false>
FASTZO_HD void gaussian4(const PhiloxWords& w, float& z0, float& z1, float& z2, float& z3) {
  const float log_a = -2.0f * log_uniform24(w.x0);
  const float log_b = -2.0f * log_uniform24(w.x2);
  const float radius_a = kFastMath ? sqrt_fast(log_a) : sqrt_rn(log_a);
  const float radius_b = kFastMath ? sqrt_fast(log_b) : sqrt_rn(log_b);
  float sin_a, cos_a, sin_b, cos_b;
  if (kFastMath) {
    sincos_2pi_uniform24_fast(w.x1, sin_a, cos_a);
    sincos_2pi_uniform24_fast(w.x3, sin_b, cos_b);
  } else {
    sincos_2pi_uniform24(w.x1, sin_a, cos_a);
    sincos_2pi_uniform24(w.x3, sin_b, cos_b);
  }
  z0 = radius_a * cos_a;
  z1 = radius_a * sin_a;
  z2 = radius_b * cos_b;
  z3 = radius_b * sin_b;
}

// Rademacher: element 128j + 32w + b is bit b of word w; 0 -> +1, 1 -> -1.
FASTZO_HD float rademacher(uint32_t word, int bit) {
  return 1.0f - 2.0f * static_cast<float>(static_cast<int32_t>((word >> bit) & 1u));
}

// The same z as a sign bit (0 for +1, 0x80000000 for -1): c * z is then c with that sign
// flipped, exactly (times_sign), one logic operation instead of a conversion and two float ops.
FASTZO_HD uint32_t rademacher_sign(uint32_t word, int bit) { return (word << (31 - bit)) & 0x80000000u; }

FASTZO_HD float times_sign(float c, uint32_t sign) { return bits_float(float_bits(c) ^ sign); }

// Stochastic-rounding bits: element 8j + h takes half-word h of the call, word h/2, low half
// first. The comparison value is (r + 1/2) 2^-16.
FASTZO_HD uint32_t rounding_half(const PhiloxWords& w, int h) {
  return (word_at(w, h >> 1) >> (16 * (h & 1))) & 0xFFFFu;
}

FASTZO_HD float rounding_uniform(uint32_t half) {
  return (static_cast<float>(static_cast<int32_t>(half)) + 0.5f) * 1.52587890625e-05f;
}

// ---------------------------------------------------------------------------------------------
// 16-bit storage formats, as bit patterns in uint32 (0..0xFFFF). Conversions are done by hand:
// the same code on host and device, branch-free, round to nearest even.

struct BFloat16Format {
  // For exact mode: explicit mantissa bits, exponent bias, largest finite and inf patterns.
  static constexpr int32_t kMantissaBits = 7, kBias = 127, kMaxBits = 0x7F7F, kInfBits = 0x7F80;
  FASTZO_HD float to_float(uint32_t h) { return bits_float(h << 16); }
  FASTZO_HD uint32_t round_nearest(float y) {
    const uint32_t b = float_bits(y);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return is_nan_f(y) ? 0x7FC0u : rounded;  // the NaN torch stores
  }
};

struct Float16Format {
  static constexpr int32_t kMantissaBits = 10, kBias = 15, kMaxBits = 0x7BFF, kInfBits = 0x7C00;
  // c10's fp16_ieee_to_fp32_value: exact, subnormals included.
  FASTZO_HD float to_float(uint32_t h) {
    const uint32_t w = h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 1.925929944387236e-34f;  // 2^-112
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
    return bits_float(sign | magnitude);
  }
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne); NaN -> sign | 0x7E00 like c10.
  FASTZO_HD uint32_t round_nearest(float y) {
    const uint32_t b = float_bits(y);
    const uint32_t sign = (b >> 16) & 0x8000u;
    const uint32_t a = b & 0x7FFFFFFFu;
    const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // rebias by -112, round
    // Below 2^-14: adding 0.5 rounds the value to a multiple of 2^-24, the subnormal step.
    const uint32_t subnormal = float_bits(add_rn(bits_float(a), 0.5f)) - 0x3F000000u;
    const uint32_t special = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN or overflow to inf
    const uint32_t magnitude = a >= 0x47800000u ? special : (a < 0x38800000u ? subnormal : normal);
    return sign | magnitude;
  }
};

// The contract's stochastic rounding of float32 y to a 16-bit format, given the element's
// comparison value u = rounding_uniform(r). Stores t (toward zero) or a (away from zero):
// a when u < (|y| - |t|) / (|a| - |t|). Representable, infinite and NaN results are stored as
// round-to-nearest gives them.
template <class Format>
FASTZO_HD uint32_t round_stochastic(float y, float u) {
  const uint32_t nearest = Format::round_nearest(y);
  const float y_abs = abs_f(y);
  const uint32_t toward =
      abs_f(Format::to_float(nearest)) > y_abs ? ((nearest - 1u) & 0xFFFFu) : nearest;
  const uint32_t sign = (float_bits(y) >> 16) & 0x8000u;
  const uint32_t away = ((toward & 0x7FFFu) + 1u) | sign;
  const float toward_value = Format::to_float(toward);
  const float toward_abs = abs_f(toward_value);
  const float gap = sub_rn(abs_f(Format::to_float(away)), toward_abs);
  const float fraction = sub_rn(y_abs, toward_abs) / gap;
  const uint32_t chosen = u < fraction ? away : toward;
  const bool exact = toward_value == y || !is_finite_f(y) || !is_finite_f(gap);
  return exact ? nearest : chosen;
}

// ---------------------------------------------------------------------------------------------
// The passes' arithmetic in float32 (docs/noise.md, "How the passes use z").

// Each in two forms: with z, and with the products scale * z given ("_by"; a Rademacher z held
// as a sign bit gives them exactly with times_sign).
FASTZO_HD float perturbed_by(float theta, float scale_z) { return add_rn(theta, scale_z); }

FASTZO_HD float perturbed(float theta, float scale, float z) { return perturbed_by(theta, mul_rn(scale, z)); }

FASTZO_HD float restored_and_updated_by(float theta, float eps_z, float decay, float step_z) {
  return sub_rn(mul_rn(add_rn(theta, eps_z), decay), step_z);
}

FASTZO_HD float restored_and_updated(float theta, float eps, float decay, float step, float z) {
  return restored_and_updated_by(theta, mul_rn(eps, z), decay, mul_rn(step, z));
}

// The fused step: restore-and-update with z, then + next_scale * z' of the next step's seed,
// rounded once when stored (stochastic-rounding bits from the current seed).
FASTZO_HD float updated_and_perturbed(float updated, float next_scale, float z_next) {
  return perturbed_by(updated, mul_rn(next_scale, z_next));
}

// ---------------------------------------------------------------------------------------------
// Exact mode for 16-bit weights (docs/noise.md, "Exact perturbation of 16-bit weights"): integer
// steps on a per-tensor grid S_q, so +eps z, -2 eps z, +eps z returns every weight bit for bit.
// Integer arithmetic only, apart from single float32 operations whose results are exact or
// rounded once (IEEE, no contraction), so host and device agree with the oracle bit for bit.

// One tensor's grid: q = 2^exponent; T = q 2^mbits; index N in [-n_max, n_max].
struct Grid {
  int32_t mbits;     // explicit mantissa bits of the storage format
  int32_t lq;        // log2(q / smallest subnormal)
  int32_t t_bits;    // 16-bit pattern of T
  int32_t n_max;     // N(largest finite value)
  int32_t inf_bits;  // 16-bit pattern of +inf
  uint32_t t_bits32; // float32 pattern of T
  float inv_q;       // 2^-exponent, a normal float32
};

// exponent: log2 q, in [-126, 120] (bfloat16) or [-24, 5] (float16), checked by the caller.
template <class Format>
FASTZO_HD Grid make_grid(int32_t exponent) {
  Grid g;
  g.mbits = Format::kMantissaBits;
  g.lq = exponent + Format::kBias + Format::kMantissaBits - 1;
  g.t_bits = (g.lq + 1) << g.mbits;
  g.n_max = (1 << g.mbits) + Format::kMaxBits - g.t_bits;
  g.inf_bits = Format::kInfBits;
  g.t_bits32 = static_cast<uint32_t>(127 + g.mbits + exponent) << 23;
  g.inv_q = bits_float(static_cast<uint32_t>(127 - exponent) << 23);
  return g;
}

FASTZO_HD int32_t min_i(int32_t a, int32_t b) { return a < b ? a : b; }
FASTZO_HD int32_t max_i(int32_t a, int32_t b) { return a > b ? a : b; }

// round_half_even(x) for float32 |x| < 2^22, from the bits of x (no float rounding mode involved).
FASTZO_HD int32_t round_half_even_int(float x) {
  const uint32_t b = float_bits(x);
  const int32_t e = static_cast<int32_t>((b >> 23) & 0xFFu);
  const int32_t sig = static_cast<int32_t>((b & 0x7FFFFFu) | 0x800000u);
  const int32_t sh = min_i(max_i(150 - e, 1), 25);  // |x| = sig 2^(e - 150)
  const int32_t whole = sig >> sh;
  const int32_t rem = sig & ((1 << sh) - 1);
  const int32_t half = 1 << (sh - 1);
  const int32_t up = (rem > half || (rem == half && (whole & 1))) ? 1 : 0;
  const int32_t r = e < 126 ? 0 : whole + up;  // |x| < 1/2 rounds to 0
  return (b >> 31) ? -r : r;
}

// N(x) of a finite 16-bit pattern: x/q below T (rounded toward zero if off the grid),
// 2^mbits + bits(|x|) - bits(T) from T on; N(-x) = -N(x).
FASTZO_HD int32_t grid_index(uint32_t h, const Grid& g) {
  const int32_t mag = static_cast<int32_t>(h & 0x7FFFu);
  const int32_t e = mag >> g.mbits;
  const int32_t m = mag & ((1 << g.mbits) - 1);
  const int32_t sig = e == 0 ? m : m + (1 << g.mbits);
  const int32_t sh = min_i(max_i(g.lq - (max_i(e, 1) - 1), 0), 31);
  const int32_t n = mag < g.t_bits ? (sig >> sh) : (1 << g.mbits) + mag - g.t_bits;
  return (h & 0x8000u) ? -n : n;
}

// N^-1: the 16-bit pattern of grid index n (|n| <= n_max); index 0 is +0.
FASTZO_HD uint32_t grid_bits(int32_t n, const Grid& g) {
  const int32_t a = n < 0 ? -n : n;
  // floor(log2 a) from the exponent of float(a), exact for a < 2^24
  const int32_t p = static_cast<int32_t>((float_bits(static_cast<float>(max_i(a, 1))) >> 23) & 0xFFu) - 127;
  const int32_t normal = ((p + g.lq - g.mbits) << g.mbits) + static_cast<int32_t>(
      static_cast<uint32_t>(a) << min_i(max_i(g.mbits - p, 0), 31));
  const int32_t subnormal = static_cast<int32_t>(static_cast<uint32_t>(a) << min_i(g.lq, 31));
  int32_t below = p + g.lq >= g.mbits ? normal : subnormal;
  below = a == 0 ? 0 : below;
  const int32_t mag = a < (1 << g.mbits) ? below : a - (1 << g.mbits) + g.t_bits;
  return static_cast<uint32_t>(mag) | (n < 0 ? 0x8000u : 0u);
}

// N^-1(wrap(N(h) + steps)); wrap keeps the index in [-n_max, n_max] (modulo 2 n_max + 1). The
// caller guarantees |steps| < 2 n_max + 1, so one conditional add or subtract is the modulo.
// inf and NaN patterns are returned unchanged.
FASTZO_HD uint32_t step_on_grid(uint32_t h, int32_t steps, const Grid& g) {
  const int32_t count = 2 * g.n_max + 1;
  int32_t r = grid_index(h, g) + steps;
  r = r > g.n_max ? r - count : r;
  r = r < -g.n_max ? r + count : r;
  return static_cast<int32_t>(h & 0x7FFFu) < g.inf_bits ? grid_bits(r, g) : h;
}

// Integer steps of one element: round_half_even(a_q z), a_q = eps / q in float32.
FASTZO_HD int32_t grid_steps(float a_q, float z) { return round_half_even_int(mul_rn(a_q, z)); }

// float32 y onto the grid: below T to a multiple of q (stochastically with u, or to nearest
// even), from T on the storage format's rounding (the contract's stochastic rounding, or RNE).
template <class Format, bool kStochastic>
FASTZO_HD uint32_t round_to_grid(float y, float u, const Grid& g) {
  const uint32_t y_bits = float_bits(y);
  const bool below = (y_bits & 0x7FFFFFFFu) < g.t_bits32;
  const float c = below ? mul_rn(abs_f(y), g.inv_q) : 0.0f;  // exact: q is a power of two
  int32_t n;
  uint32_t storage;
  if (kStochastic) {
    const int32_t whole = static_cast<int32_t>(c);
    n = whole + (u < sub_rn(c, static_cast<float>(whole)) ? 1 : 0);
    storage = round_stochastic<Format>(y, u);
  } else {
    n = round_half_even_int(c);
    storage = Format::round_nearest(y);
  }
  const uint32_t grid = grid_bits((y_bits >> 31) ? -n : n, g);
  return below ? grid : storage;
}

// The exact passes on one element (h a 16-bit pattern; a_q = fl32(eps / q) per tensor).
FASTZO_HD uint32_t exact_perturbed(uint32_t h, float a_q, int32_t multiple, float z, const Grid& g) {
  return step_on_grid(h, multiple * grid_steps(a_q, z), g);
}

// Restore by +k, update in float32 (scaled by q / spacing), store on the grid; with kNext then
// + k' of the next seed.
// inf and NaN weights are kept as they are.
template <class Format, bool kStochastic, bool kNext>
FASTZO_HD uint32_t exact_restored_and_updated(uint32_t h, float a_q, float decay, float b, float z,
                                              float u, float a_next_q, float z_next, const Grid& g) {
  const uint32_t restored = step_on_grid(h, grid_steps(a_q, z), g);
  // r = q / grid spacing at theta_0: 1 below T, 2^-(E - lq - 1) above (E the exponent field).
  // It undoes the factor spacing/q by which the steps enlarge the perturbation above T.
  const int32_t mag = static_cast<int32_t>(restored & 0x7FFFu);
  const int32_t shift = min_i(max_i((mag >> g.mbits) - (g.lq + 1), 0), 126);
  const float r = mag >= g.t_bits ? bits_float(static_cast<uint32_t>(127 - shift) << 23) : 1.0f;
  const float y = sub_rn(mul_rn(Format::to_float(restored), decay), mul_rn(mul_rn(b, z), r));
  uint32_t out = round_to_grid<Format, kStochastic>(y, u, g);
  if (kNext) out = step_on_grid(out, grid_steps(a_next_q, z_next), g);
  return static_cast<int32_t>(h & 0x7FFFu) < g.inf_bits ? out : h;
}

}  // namespace contract
}  // namespace fastzo
