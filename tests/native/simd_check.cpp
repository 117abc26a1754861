// Every CPU kernel variant of csrc/cpu_simd.h that this CPU runs, against the scalar reference:
// Philox-driven noise blocks (Rademacher and stochastic-rounding values bit for bit, Gaussian z
// within kGaussianUlp float32 ulps: the vector variants fuse the Box-Muller polynomial steps, the
// scalar code does not) and every pass over float32, bfloat16 and float16 weights bit for bit, on
// random and special values (zeros, subnormals, the largest finites, infinities, NaN) and every
// tail length. Every variant sees the same inputs, and prints a digest of its Gaussian blocks: the
// vector variants must agree bit for bit, here and across architectures.
// Torch-free, so it also builds for aarch64 and runs under qemu. Prints one line per variant;
// exits 1 on the first difference, with what differed.
//
//   g++ -std=c++17 -O2 -ffp-contract=off -fno-math-errno -fno-trapping-math -Icsrc
//       tests/native/simd_check.cpp -o simd_check && ./simd_check [blocks]
//
// `./simd_check bound MAX_ULP [draws]` instead measures the Gaussian z of every variant against
// Box-Muller in float64 (libm) on the same Philox words, in float32 ulps of the float64 value:
// `draws` random draws (default 10^7), the tails (the 2^16 smallest and 2^16 largest uniforms of
// the radius, i.e. |z| up to 5.9 and z near 0, each with 8 random angles) and all 2^24 angles
// (z near 0 where cos or sin is). Prints the maximum per variant; exits 1 if above MAX_ULP.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "cpu_simd.h"

using namespace fastzo::cpu;

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64() {  // splitmix64
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static int failures = 0;

// Vector variant against scalar Gaussian z: each is within 4 ulps of the exact value (bound).
constexpr double kGaussianUlp = 8.0;

template <class T>
static bool same_bits(const char* what, const char* variant, const T* got, const T* want, int64_t n,
                      uint64_t context) {
  if (memcmp(got, want, n * sizeof(T)) == 0) return true;
  for (int64_t i = 0; i < n; ++i) {
    if (memcmp(got + i, want + i, sizeof(T)) != 0) {
      uint32_t g = 0, w = 0;
      memcpy(&g, got + i, sizeof(T));
      memcpy(&w, want + i, sizeof(T));
      printf("MISMATCH %s %s: element %lld (context %llu): 0x%08x, scalar 0x%08x\n", variant, what,
             (long long)i, (unsigned long long)context, g, w);
      break;
    }
  }
  ++failures;
  return false;
}

// Spacing of float32 values at |v| (subnormal floor).
static double ulp32(double v) {
  int e;
  frexp(fabs(v), &e);  // |v| = m 2^e, m in [1/2, 1)
  return ldexp(1.0, std::max(e - 24, -149));
}

// got within kGaussianUlp ulps of want, element by element; the largest difference seen so far.
static double gaussian_ulp_max = 0;
static bool close_gaussian(const char* variant, const float* got, const float* want, int64_t n,
                           uint64_t context) {
  for (int64_t i = 0; i < n; ++i) {
    const double ulps = fabs(static_cast<double>(got[i]) - want[i]) / ulp32(want[i]);
    gaussian_ulp_max = std::max(gaussian_ulp_max, ulps);
    if (!(ulps <= kGaussianUlp)) {
      printf("MISMATCH %s gaussian_block: element %lld (context %llu): %.9g, scalar %.9g "
             "(%.1f ulp)\n", variant, (long long)i, (unsigned long long)context, got[i], want[i],
             ulps);
      ++failures;
      return false;
    }
  }
  return true;
}

// FNV-1a over the bytes of n values: the digest of a variant's Gaussian blocks.
static uint64_t fnv1a(uint64_t h, const void* data, size_t bytes) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
  return h;
}

// A float32 weight: mostly N(0, 0.02)-sized values, sometimes special ones.
static float random_weight() {
  const uint64_t r = next_u64();
  const uint32_t bits = static_cast<uint32_t>(r >> 32);
  switch (r & 31) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: { float f; uint32_t b = (bits & 0x807FFFFFu); memcpy(&f, &b, 4); return f; }  // subnormal
    case 3: return 3.3895314e38f;   // bfloat16's largest finite
    case 4: return -65504.0f;       // float16's largest finite
    case 5: return 1.0f / 0.0f;
    case 6: return -1.0f / 0.0f;
    case 7: { float f; uint32_t b = 0x7FC00000u | (bits & 0x3FFFFF); memcpy(&f, &b, 4); return f; }
    case 8: return 6.1035156e-05f;  // float16's smallest normal
    case 9: { float f; uint32_t b = (bits & 0x80000000u) | 0x33800000u; memcpy(&f, &b, 4); return f; }
    default: {
      // uniform exponent in [2^-30, 2^2), random sign and mantissa
      float f; uint32_t b = (bits & 0x807FFFFFu) | ((97u + (bits >> 23) % 32u) << 23);
      memcpy(&f, &b, 4); return f;
    }
  }
}

static uint16_t to_bits16(float f, StorageKind s) {
  return static_cast<uint16_t>(s == StorageKind::kBFloat16 ? fastzo::contract::BFloat16Format::round_nearest(f)
                                                           : fastzo::contract::Float16Format::round_nearest(f));
}

static double uniform_of(uint32_t x) { return (static_cast<double>(x >> 8) + 0.5) * 0x1p-24; }

struct ErrorStats {
  double max_ulp = 0, max_abs = 0;
  uint32_t worst[2] = {0, 0};
  int64_t count = 0;
};

// z of words (x0, x1): z0 = r(x0) cos(2 pi u(x1)), z1 = r(x0) sin(2 pi u(x1)); x2, x3 likewise.
static void measure(const Variant& v, const std::vector<uint32_t>* x, ErrorStats& stats) {
  const int64_t groups = static_cast<int64_t>(x[0].size());
  std::vector<float> z(4 * groups);
  v.gaussian_words(x[0].data(), x[1].data(), x[2].data(), x[3].data(), z.data(), groups);
  for (int64_t j = 0; j < groups; ++j) {
    for (int pair = 0; pair < 2; ++pair) {
      const uint32_t xr = x[2 * pair][j], xa = x[2 * pair + 1][j];
      const double radius = sqrt(-2.0 * log(uniform_of(xr)));
      const double angle = 2.0 * M_PI * uniform_of(xa);
      const double want[2] = {radius * cos(angle), radius * sin(angle)};
      for (int c = 0; c < 2; ++c) {
        const double err = fabs(static_cast<double>(z[4 * j + 2 * pair + c]) - want[c]);
        const double ulps = err / ulp32(want[c]);
        if (ulps > stats.max_ulp) {
          stats.max_ulp = ulps;
          stats.worst[0] = xr;
          stats.worst[1] = xa;
        }
        stats.max_abs = std::max(stats.max_abs, err);
        ++stats.count;
      }
    }
  }
}

static int bound_main(double max_ulp, int64_t draws) {
  int status = 0;
  for (const Variant& v : kVariants) {
    if (!cpu_can_run(v)) continue;
    ErrorStats random_stats, tail_stats, angle_stats;
    std::vector<uint32_t> x[4];
    // Random draws, 4 z per group, in slices.
    const int64_t slice = 1 << 20;
    for (int64_t done = 0; done < draws; done += 4 * slice) {
      const int64_t groups = std::min<int64_t>(slice, (draws - done + 3) / 4);
      for (auto& words : x) {
        words.resize(groups);
        for (auto& w : words) w = static_cast<uint32_t>(next_u64());
      }
      measure(v, x, random_stats);
    }
    // Tails of the radius: the smallest and the largest 2^16 values of x >> 8.
    for (auto& words : x) words.clear();
    for (uint32_t k = 0; k < (1u << 16); ++k) {
      for (int rep = 0; rep < 8; ++rep) {
        x[0].push_back(k << 8);
        x[2].push_back(((1u << 24) - 1 - k) << 8);
        x[1].push_back(static_cast<uint32_t>(next_u64()));
        x[3].push_back(static_cast<uint32_t>(next_u64()));
      }
    }
    measure(v, x, tail_stats);
    // Every angle, with random radii.
    for (auto& words : x) words.clear();
    for (uint32_t k = 0; k < (1u << 24); k += 2) {
      x[1].push_back(k << 8);
      x[3].push_back((k + 1) << 8);
      x[0].push_back(static_cast<uint32_t>(next_u64()));
      x[2].push_back(static_cast<uint32_t>(next_u64()));
    }
    measure(v, x, angle_stats);
    const ErrorStats* parts[] = {&random_stats, &tail_stats, &angle_stats};
    const char* names[] = {"random", "radius tails", "all angles"};
    for (int p = 0; p < 3; ++p) {
      printf("%s %s: %lld z, max %.3f ulp (words 0x%08x 0x%08x), max |dz| %.3g\n", v.name,
             names[p], (long long)parts[p]->count, parts[p]->max_ulp, parts[p]->worst[0],
             parts[p]->worst[1], parts[p]->max_abs);
      if (parts[p]->max_ulp > max_ulp || parts[p]->max_abs > 2e-5) status = 1;
    }
  }
  return status;
}

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "bound") == 0) {
    return bound_main(argc > 2 ? atof(argv[2]) : 4.0, argc > 3 ? atoll(argv[3]) : 10000000);
  }
  const int blocks = argc > 1 ? atoi(argv[1]) : 200;
  const Variant* reference = find_variant("scalar");
  alignas(64) float want[kBlock], got[kBlock];
  alignas(64) uint16_t want_r[kBlock], got_r[kBlock];
  for (const Variant& v : kVariants) {
    if (&v == reference) continue;
    if (!cpu_can_run(v)) {
      printf("%s: not run (this CPU lacks it)\n", v.name);
      continue;
    }
    const int before = failures;
    rng_state = 0x9E3779B97F4A7C15ull;  // the same inputs for every variant
    gaussian_ulp_max = 0;
    uint64_t digest = 0xCBF29CE484222325ull;
    // Noise blocks: random seeds, keys and block positions, including group indices with a
    // nonzero high word and blocks right below 2^32 groups.
    for (int t = 0; t < blocks && failures == before; ++t) {
      const uint64_t seed = next_u64();
      const uint32_t key = static_cast<uint32_t>(next_u64());
      uint64_t block = next_u64() >> (t % 3 == 0 ? 10 : 40);
      if (t % 7 == 1) block = (uint64_t{1} << 32) * 4 / kBlock - 1 - (t % 3);  // top of the low word
      const uint64_t start = block * kBlock;
      const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
      reference->gaussian_block(want, start, key, lo, hi);
      v.gaussian_block(got, start, key, lo, hi);
      close_gaussian(v.name, got, want, kBlock, t);
      digest = fnv1a(digest, got, sizeof got);
      reference->rademacher_block(want, start, key, lo, hi);
      v.rademacher_block(got, start, key, lo, hi);
      same_bits("rademacher_block", v.name, got, want, kBlock, t);
      reference->rounding_block(want_r, start, key, lo, hi);
      v.rounding_block(got_r, start, key, lo, hi);
      same_bits("rounding_block", v.name, got_r, want_r, kBlock, t);
    }
    // Passes: every storage and pass kind, every start and length class of a block's range.
    alignas(64) float z[kBlock], z_next[kBlock];
    alignas(64) uint16_t u[kBlock];
    const StorageKind storages[] = {StorageKind::kFloat32, StorageKind::kBFloat16, StorageKind::kFloat16};
    const PassKind passes[] = {{false, false, false}, {true, false, false}, {true, true, false},
                               {true, false, true}, {true, true, true}};
    std::vector<float> w32(kBlock), g32(kBlock);
    std::vector<uint16_t> w16(kBlock), g16(kBlock);
    for (int t = 0; t < blocks && failures == before; ++t) {
      const uint64_t seed = next_u64();
      reference->gaussian_block(z, (t % 50) * kBlock, 3, static_cast<uint32_t>(seed), 1);
      reference->rademacher_block(z_next, (t % 50) * kBlock, 4, static_cast<uint32_t>(seed), 2);
      reference->rounding_block(u, (t % 50) * kBlock, 3, static_cast<uint32_t>(seed), 1);
      // Scales from tiny to huge, so updates land below, at and above the 16-bit spacing.
      const float scales[] = {1e-3f, 0.5f, 3e-8f, 1e30f, -2e-3f};
      const float a = scales[t % 5], b = scales[(t + 2) % 5] * 0.25f, a_next = scales[(t + 1) % 5];
      const float decay = (t % 4 == 0) ? 1.0f : 0.999f;
      const int64_t skip = static_cast<int64_t>(next_u64() % 40);
      const int64_t count = 1 + static_cast<int64_t>(next_u64() % (kBlock - skip));
      for (StorageKind s : storages) {
        for (const PassKind& pass : passes) {
          for (int i = 0; i < kBlock; ++i) {
            w32[i] = random_weight();
            w16[i] = to_bits16(w32[i], s);
            // and any 16-bit pattern: subnormals, infinities, NaN payloads (quiet and signalling)
            if (next_u64() % 8 == 0) w16[i] = static_cast<uint16_t>(next_u64());
          }
          g32 = w32;
          g16 = w16;
          const bool half = s != StorageKind::kFloat32;
          void* want_data = half ? static_cast<void*>(w16.data() + skip) : static_cast<void*>(w32.data() + skip);
          void* got_data = half ? static_cast<void*>(g16.data() + skip) : static_cast<void*>(g32.data() + skip);
          reference->apply_block(s, pass, ApplyArgs{want_data, z + skip, u + skip, z_next + skip, count, a, decay, b, a_next});
          v.apply_block(s, pass, ApplyArgs{got_data, z + skip, u + skip, z_next + skip, count, a, decay, b, a_next});
          char what[96];
          snprintf(what, sizeof what, "apply_block storage %d update %d stochastic %d next %d",
                   static_cast<int>(s), pass.update, pass.stochastic, pass.next);
          if (half) {
            same_bits(what, v.name, g16.data(), w16.data(), kBlock, t);
          } else {
            same_bits(what, v.name, g32.data(), w32.data(), kBlock, t);
          }
        }
      }
    }
    printf("%s: %s scalar (%d noise blocks, %d pass blocks x 15 kinds; bit for bit, Gaussian z "
           "within %.2f ulp)\n", v.name, failures == before ? "agrees with" : "DIFFERS from",
           blocks, blocks, gaussian_ulp_max);
    printf("%s: gaussian digest %016llx\n", v.name, (unsigned long long)digest);
  }
  return failures == 0 ? 0 : 1;
}
