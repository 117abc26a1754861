"""Backend "triton": fused in-place passes, one multi-tensor launch per storage dtype.

Each pass reads and writes every element once. The noise is regenerated in the kernel from the
contract's Philox counters; nothing the size of a weight is allocated. A persistent grid walks a
small device-side table of (address, numel, key, offset) rows, so a model with hundreds of
tensors costs one launch per dtype, not one per tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re

import torch

from .. import noise
from . import fast_math_from_environment

NAME = "triton"

try:
    import triton
    import triton.language as tl
except Exception as exc:  # triton missing or broken: the backend reports this error
    triton = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Elements per program on a GPU: 2048 at 8 warps is 8 per thread, 128-bit accesses for float32
# (two for 16-bit), and keeps every pass at or below 64 registers (4096 took 142-165, one
# 256-thread block per SM). The interpreter pays per program and per block, not per element:
# large blocks keep it fast.
GPU_BLOCK = 2048
BLOCK = 65536 if INTERPRET else GPU_BLOCK
NUM_WARPS = 8
# Fast math: hardware sin.approx / cos.approx for the Box–Muller angle of the plain (not exact)
# Gaussian passes, |Δz| ≤ 4.5e-6 (docs/noise.md, "Fast math"). On by default, chosen from the
# static model (docs/performance.md); FASTZO_FAST_MATH=0 turns it off (read at import; this
# attribute may be changed at run time).
FAST_MATH = fast_math_from_environment()


def check_available() -> None:
    if triton is None:
        raise _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)")


def supports_device(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


if triton is not None:
    INTERPRET_CONST = tl.constexpr(INTERPRET)

    @triton.jit
    def _philox(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 blocks; identical to fastzo.noise.philox4x32_10.

        Each round's products as one 32 x 32 -> 64-bit multiply (one IMAD.WIDE.U32 on a GPU,
        where umulhi and the low product are two instructions)."""
        for _ in tl.static_range(10):
            p0 = c0.to(tl.uint64) * 0xD2511F53
            p2 = c2.to(tl.uint64) * 0xCD9E8D57
            c0 = (p2 >> 32).to(tl.uint32) ^ c1 ^ k0
            c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
            c1 = p2.to(tl.uint32)
            c3 = p0.to(tl.uint32)
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        return c0, c1, c2, c3

    @triton.jit
    def _philox_groups(group, key, stream: tl.constexpr, k0, k1):
        """Philox words for int64 group indices of one tensor key and stream."""
        c0 = (group & 0xFFFFFFFF).to(tl.uint32)
        c1 = (group >> 32).to(tl.uint32)
        c2 = (c0 * 0 + key).to(tl.uint32)
        c3 = c0 * 0 + stream
        return _philox(c0, c1, c2, c3, k0, k1)

    # Box–Muller as in csrc/noise_contract.h (log_uniform24, sincos_2pi_uniform24): short
    # polynomials on arguments reduced exactly from the 24-bit integer. libdevice's accurate logf,
    # division and sinf/cosf cost about 87 instructions per element on sm_90 where these cost 49;
    # the error against the float64 oracle stays below 1e-6 (the contract allows 2e-5).
    @triton.jit
    def _log_uniform24(x):
        """ln u for u = (k + 0.5)·2**-24, k = x >> 8, to about one ulp over the whole range.

        u = n·2**-25 with n = 2k + 1 odd; n = 2**e·(1 + f) with f exact in float32, then Cephes'
        log1p polynomial and ln 2 in two parts. float32 cannot hold u itself for u ≥ 1/2.
        """
        k = (x >> 8).to(tl.int32)
        n = 2 * k + 1
        e = (n.to(tl.float32).to(tl.int32, bitcast=True) - 0x3F3504F3) >> 23  # sqrt(1/2)
        inv_pow2 = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e
        f = tl.fma(k.to(tl.float32), 2.0 * inv_pow2, -1.0) + inv_pow2  # exact
        exponent = (e - 25).to(tl.float32)
        f2 = f * f
        p = tl.fma(tl.full(f.shape, 7.0376836292e-2, tl.float32), f, -1.1514610310e-1)
        p = tl.fma(p, f, 1.1676998740e-1)
        p = tl.fma(p, f, -1.2420140846e-1)
        p = tl.fma(p, f, 1.4249322787e-1)
        p = tl.fma(p, f, -1.6668057665e-1)
        p = tl.fma(p, f, 2.0000714765e-1)
        p = tl.fma(p, f, -2.4999993993e-1)
        p = tl.fma(p, f, 3.3333331174e-1)
        # the last steps fused too (one instruction each instead of two; every one of them
        # rounds at most once, so the error only shrinks)
        y = tl.fma(exponent, -2.12194440e-4, p * f * f2)
        y = tl.fma(f2, -0.5, y)
        return tl.fma(exponent, 0.693359375, f + y)

    @triton.jit
    def _sincos_2pi_uniform24(x, HW_TRIG: tl.constexpr):
        """sin and cos of 2π·u, u = (k + 0.5)·2**-24, k = x >> 8.

        Default: quarter turns taken off the integer (exact), Cephes polynomials on [−π/4, π/4].
        HW_TRIG (fast math): the angle reduced exactly to [−π, π] and the hardware's sin.approx /
        cos.approx (absolute error ≤ 2**-20.5 there, per the PTX ISA).
        """
        if HW_TRIG:
            # u − round(u) in units of 2**-24, in [−2**23, 2**23): k's low 24 bits, signed
            rem = x.to(tl.int32, bitcast=True) >> 8
            # (rem + 0.5)·2π·2**-24 rounded once, as one fma (rem + 0.5 is exact)
            angle = tl.fma(rem.to(tl.float32), 3.7450702829239286e-07, 1.8725351414619643e-07)
            s, c = _hw_sincos(angle)
        else:
            k = (x >> 8).to(tl.int32)
            q = (k + (1 << 21)) >> 22  # nearest quarter turn, 0..4 (never a tie)
            rem = k - (q << 22)  # [−2**21, 2**21)
            # a = ((rem + 0.5)·2**-22)·(π/2) as the contract rounds it (the first product is
            # exact), in one fma: rem·(π/2·2**-22) + π/2·2**-23, rounded once to the same value
            a = tl.fma(rem.to(tl.float32), 1.5707963267948966 * 2.384185791015625e-07,
                       1.5707963267948966 * 1.1920928955078125e-07)
            a2 = a * a
            sp = tl.fma(tl.full(a2.shape, -1.9515295891e-4, tl.float32), a2, 8.3321608736e-3)
            sp = tl.fma(sp, a2, -1.6666654611e-1)
            sp = tl.fma(sp * a2, a, a)
            cp = tl.fma(tl.full(a2.shape, 2.443315711809948e-5, tl.float32), a2, -1.388731625493765e-3)
            cp = tl.fma(cp, a2, 4.166664568298827e-2)
            cp = tl.fma(cp * a2, a2, tl.fma(a2, -0.5, 1.0))
            odd = (q & 1) != 0
            s_base = tl.where(odd, cp, sp)
            c_base = tl.where(odd, sp, cp)
            s = (s_base.to(tl.int32, bitcast=True) ^ ((q & 2) << 30)).to(tl.float32, bitcast=True)
            c = (c_base.to(tl.int32, bitcast=True) ^ (((q + 1) & 2) << 30)).to(tl.float32,
                                                                                bitcast=True)
        return s, c

    @triton.jit
    def _hw_sincos(angle):
        if INTERPRET_CONST:
            return tl.sin(angle), tl.cos(angle)  # the interpreter has no PTX: numpy's float32
        else:
            s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [angle],
                                          dtype=tl.float32, is_pure=True, pack=1)
            c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [angle],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return s, c

    @triton.jit
    def _gaussian4(group, key, k0, k1, HW_TRIG: tl.constexpr):
        """The four Gaussian z of each Philox call `group`, in element order 4·group + 0..3."""
        x0, x1, x2, x3 = _philox_groups(group, key, 0, k0, k1)
        r_a = tl.sqrt(-2.0 * _log_uniform24(x0))
        r_b = tl.sqrt(-2.0 * _log_uniform24(x2))
        s_a, c_a = _sincos_2pi_uniform24(x1, HW_TRIG)
        s_b, c_b = _sincos_2pi_uniform24(x3, HW_TRIG)
        return r_a * c_a, r_a * s_a, r_b * c_b, r_b * s_b

    @triton.jit
    def _noise_block(unit, key, k0, k1, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr,
                     HW_TRIG: tl.constexpr, PAIRS: tl.constexpr):
        """z for global elements [128·unit, 128·unit + BLOCK). Gaussian: float32 z; Rademacher:
        z's sign bit (int32 0 for +1, 0x80000000 for −1)."""
        if GAUSSIAN:
            # A lane's z must be contiguous in the layout of its 128-bit access (4 float32 or 8
            # 16-bit elements), or the compiler converts layouts through shared memory.
            if PAIRS:  # two Philox calls per lane, assembled with joins: 8·pair + 4·call + 2·ab + cs
                pair = unit * 16 + tl.arange(0, BLOCK // 8).to(tl.int64)
                e0, e1, e2, e3 = _gaussian4(2 * pair, key, k0, k1, HW_TRIG)
                o0, o1, o2, o3 = _gaussian4(2 * pair + 1, key, k0, k1, HW_TRIG)
                cos_part = tl.join(tl.join(e0, o0), tl.join(e2, o2))
                sin_part = tl.join(tl.join(e1, o1), tl.join(e3, o3))
                z = tl.reshape(tl.join(cos_part, sin_part), (BLOCK,))
            else:  # one call per lane: 4·group + 2·ab + cs
                group = unit * 32 + tl.arange(0, BLOCK // 4).to(tl.int64)
                z0, z1, z2, z3 = _gaussian4(group, key, k0, k1, HW_TRIG)
                z = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
        elif PAIRS:  # Rademacher, z = ±1 as its sign bit (see _times_noise), by lane: each row
            # of 8 elements (one 128-bit access) takes its byte of its word of its Philox call
            row = tl.arange(0, BLOCK // 8)
            x0, x1, x2, x3 = _philox_groups(unit + (row // 16).to(tl.int64), key, 1, k0, k1)
            w = row // 4 % 4
            word = tl.where(w >= 2, tl.where(w == 3, x3, x2), tl.where(w == 1, x1, x0))
            byte = word >> (row % 4 * 8).to(tl.uint32)
            shifts = (31 - tl.arange(0, 8))[None, :].to(tl.uint32)
            signs = (byte[:, None] << shifts) & 0x80000000  # bit b: 1 gives −1
            z = tl.reshape(signs, (BLOCK,)).to(tl.int32, bitcast=True)
        else:  # float32 (two 128-bit accesses per lane): the words spread across lanes
            group = unit + tl.arange(0, BLOCK // 128).to(tl.int64)
            x0, x1, x2, x3 = _philox_groups(group, key, 1, k0, k1)
            words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))
            shifts = (31 - tl.arange(0, 32))[None, :].to(tl.uint32)
            signs = (words[:, None] << shifts) & 0x80000000  # bit b of the word: 1 gives −1
            z = tl.reshape(signs, (BLOCK,)).to(tl.int32, bitcast=True)
        return z

    @triton.jit
    def _times_noise(c, z, GAUSSIAN: tl.constexpr):
        """c·z for float32 c and the noise z of _noise_block. A Rademacher z is ±1, held as its
        sign bit: c·(±1) is c with that sign flipped, exactly (one logic operation, not an
        integer-to-float conversion, a subtraction and a multiplication)."""
        if GAUSSIAN:
            return c * z
        else:
            return (tl.cast(c, tl.float32).to(tl.int32, bitcast=True) ^ z).to(tl.float32,
                                                                            bitcast=True)

    @triton.jit
    def _round_bf16_bits(y):
        """float32 -> bfloat16 bit pattern (int32), round to nearest even, NaN kept NaN.

        Done by hand because the interpreter's .to(bfloat16) truncates.
        """
        bits = y.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(y != y, 0x7FC0, rounded & 0xFFFF)

    @triton.jit
    def _to_f32(bits16, IS_BF16: tl.constexpr):
        """16-bit pattern (int32 holding 0..0xFFFF) -> float32, exact."""
        if IS_BF16:
            return (bits16 << 16).to(tl.float32, bitcast=True)
        else:
            return bits16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _nearest_bits(y, IS_BF16: tl.constexpr):
        if IS_BF16:
            return _round_bf16_bits(y)
        else:
            return y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def _stored(y, DTYPE: tl.constexpr):
        """float32 y rounded to nearest even in the storage dtype."""
        if DTYPE == tl.bfloat16:
            if INTERPRET_CONST:  # the interpreter's conversion truncates: round by hand
                return _round_bf16_bits(y).to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:  # one cvt.rn.bf16x2.f32 per two elements instead of five integer operations
                return y.to(tl.bfloat16, fp_downcast_rounding="rtne")
        else:
            return y.to(DTYPE)

    @triton.jit
    def _stochastic_value(y, rbits, DTYPE: tl.constexpr):
        """The contract's stochastic rounding of float32 y, as a DTYPE (16-bit) tensor."""
        if DTYPE == tl.bfloat16:
            return _stochastic_bf16(y, rbits)
        else:
            return _stochastic_f16(y, rbits)

    @triton.jit
    def _stochastic_bits(y, rbits, IS_BF16: tl.constexpr):
        """Bit pattern (int32 holding 0..0xFFFF) of the contract's stochastic rounding of y."""
        if IS_BF16:
            rounded = _stochastic_bf16(y, rbits)
        else:
            rounded = _stochastic_f16(y, rbits)
        return rounded.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def _stochastic_bf16(y, rbits):
        """The contract's stochastic rounding of float32 y to bfloat16, in integers.

        The neighbour towards zero is y's top half, the fraction of the gap is exactly
        low16 / 2**16, so "(r + 0.5)·2**-16 < fraction" is "r < low16", and adding 2**16 to y's
        bits moves the top half one step away from zero. From 0x7F7F0000 on (the next value
        away is inf) and for inf, round to nearest: with r = 0x7FFF the rule goes away exactly
        when low16 ≥ 0x8000, and 0x7F7F is odd, so ties go away, to the even inf; inf's low half
        is 0. NaN is stored as 0x7FC0. Identical to the contract's float rule for every float32 y
        and r (tested); the same code in the interpreter and on a GPU.
        """
        bits = y.to(tl.int32, bitcast=True)
        r = tl.where(tl.abs(y) >= 3.3895313892515355e+38, 0x7FFF, rbits)  # 0x7F7F0000
        away = r < (bits & 0xFFFF)
        chosen = bits + tl.where(away, 0x10000, 0)
        return _high_halves(tl.where(y != y, 0x7FC00000, chosen))

    @triton.jit
    def _high_halves(words):
        """The high halves of int32 words as bfloat16: one PRMT per two elements on a GPU."""
        if INTERPRET_CONST:
            return (words >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [words],
                                             dtype=tl.bfloat16, is_pure=True, pack=2)

    @triton.jit
    def _bf16_to_f32(raw):
        """bfloat16 to float32 (exact): one instruction per element on a GPU."""
        if INTERPRET_CONST:
            return raw.to(tl.float32)
        else:
            return tl.inline_asm_elementwise("{shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000;}",
                                             "=r,=r,r", [raw], dtype=tl.float32, is_pure=True,
                                             pack=2)

    @triton.jit
    def _f16_toward_zero(y):
        """float16 of float32 y rounded toward zero (inf and NaN kept; finite overflow to the
        largest finite value): one cvt.rz.f16x2.f32 per two elements on a GPU."""
        if INTERPRET_CONST:  # the interpreter's conversion is not IEEE in every range: by hand
            bits = y.to(tl.int32, bitcast=True)
            a = bits & 0x7FFFFFFF
            e = a >> 23
            sig = (a & 0x7FFFFF) | 0x800000
            subnormal = sig >> tl.minimum(126 - e, 31)  # multiples of 2**-24 below 2**-14
            mag = tl.where(e >= 113, (a >> 13) - (112 << 10), subnormal)
            mag = tl.where(a >= 0x477FE000, 0x7BFF, mag)  # from 65504 on: the largest finite
            mag = tl.where(a >= 0x7F800000, tl.where(a == 0x7F800000, 0x7C00, 0x7E00), mag)
            return (mag | ((bits >> 16) & 0x8000)).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            return y.to(tl.float16, fp_downcast_rounding="rtz")

    @triton.jit
    def _stochastic_f16(y, rbits):
        """The contract's stochastic rounding of float32 y to float16, without a division.

        t = y rounded toward zero (one conversion per two elements); the gap to the next value
        away from zero is the float16 spacing at |y|, a power of two: 2**(E − 137) for the
        float32 exponent field E ≥ 113, 2**-24 below. With u = (r + 0.5)·2**-16, the contract's
        "u < (|y| − |t|) / gap" is "u·gap < |y| − |t|": both sides exact in float32, u·gap built
        from the bits of 1 + u. Adding one to t's bits moves it one step away from zero. From
        65504 on (the next value away is inf), round to nearest: away exactly when
        |y| − 65504 ≥ 16 (ties go to the even inf); inf and NaN stay (|y| − |t| is NaN).
        Identical to the contract's float rule for every float32 y and r (tested).
        """
        toward = _f16_toward_zero(y)
        y_abs = tl.abs(y)
        beyond = y_abs - tl.abs(toward.to(tl.float32))  # exact: the bits t dropped
        exponent = y.to(tl.int32, bitcast=True) & 0x7F800000
        gap = tl.maximum(exponent - (10 << 23), 103 << 23).to(tl.float32, bitcast=True)
        one_plus_u = (0x3F800040 | (rbits << 7)).to(tl.float32, bitcast=True)
        threshold = tl.fma(one_plus_u, gap, -gap)  # u·gap, exact
        threshold = tl.where(y_abs >= 65504.0, 15.99609375, threshold)  # 16 − 2**-8
        away = (threshold < beyond).to(tl.int16)
        return (toward.to(tl.int16, bitcast=True) + away).to(tl.float16, bitcast=True)

    # ---- exact mode (docs/noise.md, "Exact perturbation of 16-bit weights"): integer ops only,
    # so the interpreter and every GPU agree bit for bit.
    @triton.jit
    def _rne_int(x):
        """round_half_even(x) as int32 for float32 |x| < 2**22, from the bits of x."""
        b = x.to(tl.int32, bitcast=True)
        e = (b >> 23) & 0xFF
        sig = (b & 0x7FFFFF) | 0x800000
        sh = tl.minimum(tl.maximum(150 - e, 1), 25)  # x = sig * 2**(e - 150)
        whole = sig >> sh
        rem = sig & ((1 << sh) - 1)
        half = 1 << (sh - 1)
        up = (rem > half) | ((rem == half) & ((whole & 1) == 1))
        r = tl.where(e < 126, 0, whole + up.to(tl.int32))  # |x| < 0.5 rounds to 0
        return tl.where(b < 0, -r, r)

    @triton.jit
    def _grid_index(bits, lq, t_bits, MBITS: tl.constexpr):
        """N(x) of 16-bit patterns: x/q below T, 2**MBITS + bits(|x|) - bits(T) above."""
        mag = bits & 0x7FFF
        e = mag >> MBITS
        m = mag & ((1 << MBITS) - 1)
        sig = tl.where(e == 0, m, m + (1 << MBITS))
        sh = tl.minimum(tl.maximum(lq - (tl.maximum(e, 1) - 1), 0), 31)
        n = tl.where(mag < t_bits, sig >> sh, (1 << MBITS) + mag - t_bits)
        return tl.where(bits >= 0x8000, -n, n)

    @triton.jit
    def _grid_bits(n, lq, t_bits, MBITS: tl.constexpr):
        """N⁻¹: 16-bit pattern (int32) of grid index n; index 0 is +0."""
        a = tl.abs(n)
        p = ((tl.maximum(a, 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        normal = ((p + lq - MBITS) << MBITS) + (a << tl.minimum(tl.maximum(MBITS - p, 0), 31))
        subnormal = a << tl.minimum(lq, 31)
        below = tl.where(p + lq >= MBITS, normal, subnormal)
        below = tl.where(a == 0, 0, below)
        mag = tl.where(a < (1 << MBITS), below, a - (1 << MBITS) + t_bits)
        return tl.where(n < 0, mag | 0x8000, mag)

    @triton.jit
    def _step_on_grid(bits, steps, lq, t_bits, n_max, MBITS: tl.constexpr, INF_BITS: tl.constexpr):
        """N⁻¹(wrap(N(bits) + steps)); inf/NaN patterns unchanged."""
        count = 2 * n_max + 1  # |steps| < count (checked by the caller): one wrap suffices
        r = _grid_index(bits, lq, t_bits, MBITS) + steps
        r = tl.where(r > n_max, r - count, r)
        r = tl.where(r < -n_max, r + count, r)
        return tl.where((bits & 0x7FFF) < INF_BITS, _grid_bits(r, lq, t_bits, MBITS), bits)

    @triton.jit
    def _round_to_grid(y, rbits, inv_q, t_bits32, lq, t_bits, IS_BF16: tl.constexpr,
                       MBITS: tl.constexpr, STOCHASTIC: tl.constexpr):
        """float32 y onto S_q: below T to multiples of q, at/above T the storage rounding."""
        y_bits = y.to(tl.int32, bitcast=True)
        below = (y_bits & 0x7FFFFFFF) < t_bits32
        c = tl.where(below, tl.abs(y) * inv_q, 0.0)  # exact: q is a power of two
        if STOCHASTIC:
            whole = c.to(tl.int32)
            u = (rbits.to(tl.float32) + 0.5) * 1.52587890625e-05  # 2**-16
            n = whole + (u < c - whole.to(tl.float32)).to(tl.int32)
            storage = _stochastic_bits(y, rbits, IS_BF16)
        else:
            n = _rne_int(c)
            storage = _nearest_bits(y, IS_BF16)
        grid = _grid_bits(tl.where(y_bits < 0, -n, n), lq, t_bits, MBITS)
        return tl.where(below, grid, storage)

    @triton.jit
    def _rounding_bits(unit, key, k0, k1, BLOCK: tl.constexpr):
        group = unit * 16 + tl.arange(0, BLOCK // 8).to(tl.int64)
        x0, x1, x2, x3 = _philox_groups(group, key, 2, k0, k1)
        words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))
        halves = tl.interleave(words & 0xFFFF, words >> 16)
        return halves.to(tl.int32)

    @triton.jit
    def _block_result(raw, unit, key, k0, k1, next_k0, next_k1, a, decay, b, a_next, multiple,
                      lq, t_bits, n_max, inv_q, t_bits32, a_q, a_next_q,
                      DTYPE: tl.constexpr, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr,
                      UPDATE: tl.constexpr, STOCHASTIC: tl.constexpr, NEXT: tl.constexpr,
                      EXACT: tl.constexpr, MBITS: tl.constexpr, INF_BITS: tl.constexpr,
                      HW_TRIG: tl.constexpr):
        """The values to store for the block of global elements [128·unit, 128·unit + BLOCK)."""
        IS_BF16: tl.constexpr = DTYPE == tl.bfloat16
        PAIRS: tl.constexpr = DTYPE != tl.float32  # 8 elements per 128-bit access
        z = _noise_block(unit, key, k0, k1, BLOCK, GAUSSIAN, HW_TRIG, PAIRS)
        if EXACT:
            bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            k = _rne_int(_times_noise(a_q, z, GAUSSIAN))
            if UPDATE:
                loaded = bits
                bits = _step_on_grid(bits, k, lq, t_bits, n_max, MBITS, INF_BITS)
                # r = q / grid spacing at θ₀: 1 below T, 2**-(E - lq - 1) above
                mag = bits & 0x7FFF
                shift = tl.minimum(tl.maximum((mag >> MBITS) - (lq + 1), 0), 126)
                r = tl.where(mag >= t_bits, ((127 - shift) << 23).to(tl.float32, bitcast=True), 1.0)
                y = _to_f32(bits, IS_BF16) * decay - _times_noise(b, z, GAUSSIAN) * r
                if STOCHASTIC:
                    rbits = _rounding_bits(unit, key, k0, k1, BLOCK)
                else:
                    rbits = bits
                bits = _round_to_grid(y, rbits, inv_q, t_bits32, lq, t_bits, IS_BF16, MBITS,
                                      STOCHASTIC)
                if NEXT:
                    z_next = _noise_block(unit, key, next_k0, next_k1, BLOCK, GAUSSIAN, HW_TRIG, PAIRS)
                    bits = _step_on_grid(bits, _rne_int(_times_noise(a_next_q, z_next, GAUSSIAN)),
                                         lq, t_bits, n_max, MBITS, INF_BITS)
                bits = tl.where((loaded & 0x7FFF) < INF_BITS, bits, loaded)  # inf/NaN stay
            else:
                bits = _step_on_grid(bits, multiple * k, lq, t_bits, n_max, MBITS, INF_BITS)
            return bits.to(tl.int16).to(DTYPE, bitcast=True)
        else:
            theta = _bf16_to_f32(raw) if DTYPE == tl.bfloat16 else raw.to(tl.float32)
            if UPDATE:
                y = (theta + _times_noise(a, z, GAUSSIAN)) * decay - _times_noise(b, z, GAUSSIAN)
            else:
                y = theta + _times_noise(a, z, GAUSSIAN)
            if NEXT:
                z_next = _noise_block(unit, key, next_k0, next_k1, BLOCK, GAUSSIAN, HW_TRIG, PAIRS)
                y = y + _times_noise(a_next, z_next, GAUSSIAN)
            if STOCHASTIC:
                rbits = _rounding_bits(unit, key, k0, k1, BLOCK)
                return _stochastic_value(y, rbits, DTYPE)
            else:
                return _stored(y, DTYPE)

    # Integer scalars equal to 1 would be specialised into constants; seeds and counts must not.
    @triton.jit(do_not_specialize=["n_tensors", "seed_lo", "seed_hi", "next_lo", "next_hi",
                                   "multiple"])
    def _zo_pass_kernel(
        table, n_tensors, seed_lo, seed_hi, a, decay, b, next_lo, next_hi, a_next, multiple,
        DTYPE: tl.constexpr, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr,
        UPDATE: tl.constexpr, STOCHASTIC: tl.constexpr, NEXT: tl.constexpr,
        EXACT: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MAX_BITS: tl.constexpr,
        INF_BITS: tl.constexpr, HW_TRIG: tl.constexpr,
    ):
        """perturb (UPDATE=0):  θ ← θ + a·z
        restore-and-update:    θ ← (θ + a·z)·decay − b·z
        with NEXT, also + a_next·z' where z' is the next step's noise (fused steps)

        EXACT (16-bit, q = 2**exponent per tensor; N = grid index, k(s) = rne(s/q · z)):
        perturb:            θ ← N⁻¹(wrap(N(θ) + multiple·k(a)))
        restore-and-update: θ₀ = N⁻¹(wrap(N(θ) + k(a))), θ ← grid_round(θ₀·decay − (b·z)·r)
                            with r = q / grid spacing at θ₀
        with NEXT, then N⁻¹(wrap(N(θ) + k'(a_next)))

        `table` is int64 [5, n_tensors]: address, numel, key, offset, exponent. Blocks start on
        multiples of 128 of the global element index. A block that lies wholly inside a tensor
        whose blocks start 16-byte aligned is loaded and stored unmasked through a pointer the
        compiler knows is aligned: 128-bit accesses. Edges and misaligned views take the masked
        path, with the same arithmetic.
        """
        ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        k0 = seed_lo.to(tl.uint32)
        k1 = seed_hi.to(tl.uint32)
        next_k0 = next_lo.to(tl.uint32)
        next_k1 = next_hi.to(tl.uint32)
        for t in range(n_tensors):
            addr = tl.load(table + t)
            numel = tl.load(table + n_tensors + t)
            key = tl.load(table + 2 * n_tensors + t)
            offset = tl.load(table + 3 * n_tensors + t)
            base = addr.to(tl.pointer_type(DTYPE))
            lead = offset % 128  # blocks start on a 128-element boundary of the global index
            first = addr - lead * ESIZE  # address of block 0's first element (maybe before base)
            aligned = (first % 16) == 0
            n_blocks = tl.cdiv(numel + lead, BLOCK)
            lq = 0
            t_bits = 0
            n_max = 0
            inv_q = 1.0
            t_bits32 = 0
            a_q = a
            a_next_q = a_next
            if EXACT:
                exponent = tl.load(table + 4 * n_tensors + t).to(tl.int32)
                lq = exponent + (BIAS + MBITS - 1)  # q in units of the smallest subnormal
                t_bits = (lq + 1) << MBITS  # T = q * 2**MBITS
                n_max = (1 << MBITS) + MAX_BITS - t_bits
                inv_q = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
                t_bits32 = (127 + MBITS + exponent) << 23  # T as float32 bits
                a_q = a * inv_q
                a_next_q = a_next * inv_q
            # Whole blocks [whole_lo, whole_hi) of an aligned tensor: no checks per block. The
            # others (block 0 when the tensor starts inside it, the last partial block, every
            # block of a misaligned view) are masked.
            whole_lo = (lead > 0).to(tl.int64)
            whole_hi = tl.where(aligned, tl.maximum((numel + lead) // BLOCK, whole_lo), whole_lo)
            unit0 = offset // 128  # the 128-element unit where block 0 starts
            for blk in range(pid + (pid < whole_lo).to(tl.int64) * n_programs, whole_hi,
                             n_programs):
                ptrs = tl.multiple_of((first + blk * (BLOCK * ESIZE)).to(tl.pointer_type(DTYPE)),
                                      16) + tl.arange(0, BLOCK)
                raw = tl.load(ptrs)
                tl.store(ptrs, _block_result(
                    raw, unit0 + blk * (BLOCK // 128), key, k0, k1, next_k0, next_k1, a, decay, b,
                    a_next, multiple, lq, t_bits, n_max, inv_q, t_bits32, a_q, a_next_q, DTYPE,
                    BLOCK, GAUSSIAN, UPDATE, STOCHASTIC, NEXT, EXACT, MBITS, INF_BITS, HW_TRIG))
            # the masked blocks, numbered densely: [0, whole_lo), then [whole_hi, n_blocks)
            n_edges = whole_lo + n_blocks - whole_hi
            for edge in range(pid, n_edges, n_programs):
                blk = tl.where(edge < whole_lo, edge, edge - whole_lo + whole_hi)
                local = blk * BLOCK - lead + tl.arange(0, BLOCK)
                mask = (local >= 0) & (local < numel)
                ptrs = base + local
                raw = tl.load(ptrs, mask=mask, other=0.0)
                tl.store(ptrs, _block_result(
                    raw, unit0 + blk * (BLOCK // 128), key, k0, k1, next_k0, next_k1, a, decay, b,
                    a_next, multiple, lq, t_bits, n_max, inv_q, t_bits32, a_q, a_next_q, DTYPE,
                    BLOCK, GAUSSIAN, UPDATE, STOCHASTIC, NEXT, EXACT, MBITS, INF_BITS, HW_TRIG),
                    mask=mask)


_TL_DTYPE = {}
if triton is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

_FORMAT_CONSTANTS = {  # MBITS, BIAS, MAX_BITS, INF_BITS (fastzo.noise.FORMATS16)
    dtype: (fmt.mbits, fmt.bias, fmt.max_bits, fmt.inf_bits) for dtype, fmt in noise.FORMATS16.items()
}
_DISTRIBUTIONS = ("gaussian", "rademacher")


def _as_int32(x: int) -> int:
    """A uint32 word as the int32 with the same bits: scalars then always compile as i32."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _pass_constexprs(dtype, distribution, update, stochastic, fused_next, exact, fast_math, block):
    """The compile-time constants of one launch: shared by the launch and by compile_pass."""
    mbits, bias, max_bits, inf_bits = _FORMAT_CONSTANTS.get(dtype, (0, 0, 0, 0))
    return dict(
        DTYPE=_TL_DTYPE[dtype], BLOCK=block, GAUSSIAN=distribution == "gaussian", UPDATE=bool(update),
        STOCHASTIC=bool(stochastic) and bool(update) and dtype != torch.float32,
        NEXT=bool(fused_next) and bool(update), EXACT=bool(exact), MBITS=mbits, BIAS=bias,
        MAX_BITS=max_bits, INF_BITS=inf_bits,
        HW_TRIG=bool(fast_math) and distribution == "gaussian" and not exact,
    )


# Launch options. No multiply-add contraction: the update (θ + a·z)·decay − b·z must round like
# the oracle's separate operations (Rademacher results are bit-identical to the oracle); the noise
# polynomials use explicit tl.fma instead. At most 64 registers per thread: 32 resident warps per
# SM at 8 warps per program. The fused step holds two seeds' noise and spills when capped at 64,
# so it gets 128 (16 warps per SM; docs/performance.md); exact mode's integer grid arithmetic is
# left to ptxas.
MAX_REGISTERS = 64


def register_cap(fused_next: bool, exact: bool) -> int | None:
    """The launch's register cap per thread (None: ptxas chooses)."""
    if exact:
        return None
    if fused_next:
        return 128  # left alone, ptxas chose 64 and spilled on sm_80
    return MAX_REGISTERS


def _launch_options(fused_next, exact) -> dict:
    options = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
    cap = register_cap(fused_next, exact)
    if cap is not None:
        options["maxnreg"] = cap
    return options


def _scalar_arguments(seed, a, decay, b, next_seed, a_next, multiple):
    next_seed = next_seed or 0
    return (_as_int32(seed & noise.MASK32), _as_int32(seed >> 32), float(a), float(decay), float(b),
            _as_int32(next_seed & noise.MASK32), _as_int32(next_seed >> 32), float(a_next),
            int(multiple))


# Device-side tables, kept while the optimizer passes the same tensors step after step: a
# cache hit costs no table construction and no host-to-device copy. The key is the table's
# content (addresses, sizes, keys, offsets, exponents), so a moved or resized tensor misses.
_TABLE_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_TABLE_CACHE_SIZE = 16
table_cache_stats = {"hits": 0, "misses": 0}


def _device_table(device, dtype, tensors, idxs, keys, offsets, exponents):
    ptrs = tuple(tensors[i].data_ptr() for i in idxs)
    numels = tuple(tensors[i].numel() for i in idxs)
    tkeys = tuple(keys[i] for i in idxs)
    toffs = tuple(offsets[i] for i in idxs)
    texps = tuple(exponents[i] for i in idxs) if exponents is not None else (0,) * len(idxs)
    cache_key = (device, dtype, ptrs, numels, tkeys, toffs, texps)
    hit = _TABLE_CACHE.get(cache_key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(cache_key)
        table_cache_stats["hits"] += 1
        return hit
    table_cache_stats["misses"] += 1
    table = torch.tensor([ptrs, numels, tkeys, toffs, texps], dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    total_blocks = sum(-(-(n + o % 128) // BLOCK) for n, o in zip(numels, toffs))
    entry = (table, total_blocks)
    _TABLE_CACHE[cache_key] = entry
    while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _n_programs(device: torch.device, total_blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(total_blocks, sms * 8))
    return max(1, min(total_blocks, 4))


def _launch(tensors, keys, offsets, seed, a, decay, b, distribution, update, stochastic,
            next_seed=None, a_next=0.0, exponents=None, multiple=1):
    exact = exponents is not None
    by_dtype: dict[torch.dtype, list[int]] = {}
    for idx, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(idx)
    device = tensors[0].device
    scalars = _scalar_arguments(seed, a, decay, b, next_seed, a_next, multiple)
    for dtype, idxs in by_dtype.items():
        table, total_blocks = _device_table(device, dtype, tensors, idxs, keys, offsets, exponents)
        grid = (_n_programs(device, total_blocks),)
        options = {} if INTERPRET else _launch_options(next_seed is not None and update, exact)
        _zo_pass_kernel[grid](
            table, len(idxs), *scalars,
            **_pass_constexprs(dtype, distribution, update, stochastic, next_seed is not None,
                               exact, FAST_MATH, BLOCK),
            **options,
        )


def perturb_(tensors, keys, offsets, seed, scale, distribution):
    _launch(tensors, keys, offsets, seed, scale, 1.0, 0.0, distribution, False, False)


def restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                        stochastic_rounding):
    _launch(tensors, keys, offsets, seed, eps, decay, step, distribution, True, stochastic_rounding)


def restore_update_and_perturb_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                                stochastic_rounding, next_seed, next_scale):
    _launch(tensors, keys, offsets, seed, eps, decay, step, distribution, True, stochastic_rounding,
            next_seed=next_seed, a_next=next_scale)


def exact_perturb_(tensors, keys, offsets, seed, eps, multiple, exponents, distribution):
    _launch(tensors, keys, offsets, seed, eps, 1.0, 0.0, distribution, False, False,
            exponents=exponents, multiple=multiple)


def exact_restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                              stochastic_rounding, exponents, next_seed=None, next_eps=0.0):
    _launch(tensors, keys, offsets, seed, eps, decay, step, distribution, True, stochastic_rounding,
            next_seed=next_seed, a_next=next_eps, exponents=exponents)


# ---- ahead-of-time compilation ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompiledPass:
    """One pass kernel compiled for a GPU architecture (see compile_pass)."""

    cc: int
    dtype: torch.dtype
    distribution: str
    update: bool
    stochastic_rounding: bool
    fused_next: bool
    exact: bool
    fast_math: bool
    block: int  # elements per program and loop iteration
    num_warps: int
    shared: int  # bytes of shared memory per program
    ptx: str = dataclasses.field(repr=False)
    cubin: bytes = dataclasses.field(repr=False)

    def resource_usage(self) -> dict:
        """Registers, spills, local and shared memory of the kernel, from cuobjdump.

        cuobjdump ships in Triton's wheel (triton/backends/nvidia/bin); no GPU is needed.
        """
        out = _nvidia_tool("cuobjdump", "--dump-resource-usage", self.cubin)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if m is None:
            raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
        reg, stack, shared, local = (int(g) for g in m.groups())
        return {"registers": reg, "stack": stack, "shared": shared, "local": local}

    @functools.cached_property
    def sass(self) -> str:
        """The machine code (nvdisasm, from Triton's wheel)."""
        return _nvidia_tool("nvdisasm", "-c", self.cubin)


def _nvidia_tool(name: str, *args) -> str:
    import subprocess
    import tempfile

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    *flags, cubin = args
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([path, *flags, f.name], check=True, capture_output=True,
                              text=True).stdout


def _pass_spec(cc, dtype, distribution, update, stochastic_rounding, fused_next, exact, fast_math):
    if isinstance(cc, tuple):
        cc = 10 * cc[0] + cc[1]
    if not isinstance(cc, int) or cc < 70:
        raise ValueError(f"cc must be a compute capability such as 80, 87, 90 or (9, 0); got {cc!r}")
    if dtype not in _FORMAT_CONSTANTS and dtype != torch.float32:
        raise ValueError(f"dtype must be torch.float32, bfloat16 or float16; got {dtype!r}")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}; got {distribution!r}")
    if (stochastic_rounding or fused_next) and not update:
        raise ValueError("stochastic_rounding and fused_next apply to the update pass only "
                         "(update=True)")
    if stochastic_rounding and dtype == torch.float32:
        raise ValueError("stochastic_rounding applies to 16-bit dtypes; float32 has no rounding")
    if exact and dtype == torch.float32:
        raise ValueError("exact mode applies to 16-bit dtypes only")
    fast_math = FAST_MATH if fast_math is None else bool(fast_math)
    return (cc, dtype, distribution, bool(update), bool(stochastic_rounding), bool(fused_next),
            bool(exact), fast_math and distribution == "gaussian" and not exact)


def _compile_here(spec) -> CompiledPass:
    """Compile in this process through Triton's own argument binding and specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    cc, dtype, distribution, update, stochastic, fused_next, exact, fast_math = spec
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kernel = _zo_pass_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    # A table like the launch's (a fresh int64 tensor, 16-byte aligned) and scalars of the
    # launch's types: the binder specialises them exactly as at run time.
    table = torch.zeros((5, 2), dtype=torch.int64)
    scalars = _scalar_arguments(2**63 + 12345, 1e-3, 0.999, 1e-5, 2**40 + 7, 1e-3, 3)
    kwargs = dict(_pass_constexprs(dtype, distribution, update, stochastic, fused_next, exact,
                                   fast_math, GPU_BLOCK),
                  **_launch_options(fused_next, exact))
    kwargs.update(debug=False, instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=triton.knobs.compilation.fpsan_homomorphic_casts)
    bound, specialization, options = binder(table, 2, *scalars, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    return CompiledPass(cc=cc, dtype=dtype, distribution=distribution, update=update,
                        stochastic_rounding=stochastic, fused_next=fused_next, exact=exact,
                        fast_math=fast_math, block=GPU_BLOCK, num_warps=options.num_warps,
                        shared=int(compiled.metadata.shared), ptx=compiled.asm["ptx"],
                        cubin=compiled.asm["cubin"])


_COMPILED: dict = {}


def _compile_in_subprocesses(specs, jobs):
    """Under TRITON_INTERPRET=1 the kernels here are interpreter objects: compile in fresh
    interpreters of the same fastzo without that variable, `jobs` of them side by side."""
    import pickle
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = ("import pickle, sys; from fastzo.backends import triton_backend as tb; "
            "specs = pickle.load(sys.stdin.buffer); "
            "pickle.dump([tb._compile_here(s) for s in specs], sys.stdout.buffer)")
    chunks = [specs[i::jobs] for i in range(min(jobs, len(specs)))]
    procs = []
    for chunk in chunks:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdin.write(pickle.dumps(chunk))
        proc.stdin.close()
        procs.append(proc)
    results = {}
    failures = []
    for chunk, proc in zip(chunks, procs):
        out = proc.stdout.read()
        err = proc.stderr.read()
        if proc.wait() != 0:
            failures.append(err.decode(errors="replace")[-4000:])
        else:
            results.update(zip(chunk, pickle.loads(out)))
    if failures:
        raise RuntimeError("ahead-of-time compilation failed:\n" + "\n".join(failures))
    return [results[s] for s in specs]


def pass_variants(exact: bool = True) -> list[dict]:
    """Every pass a launch can run, as compile_pass keyword arguments: dtype × distribution ×
    pass (perturb; restore-and-update, with stochastic rounding for 16-bit dtypes, and fused with
    the next step's perturbation) × exact mode (16-bit dtypes; left out with exact=False)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sixteen = dtype != torch.float32
        for distribution in _DISTRIBUTIONS:
            for ex in ((False, True) if sixteen and exact else (False,)):
                out.append(dict(dtype=dtype, distribution=distribution, update=False,
                                stochastic_rounding=False, fused_next=False, exact=ex))
                for stochastic in ((False, True) if sixteen else (False,)):
                    for fused_next in (False, True):
                        out.append(dict(dtype=dtype, distribution=distribution, update=True,
                                        stochastic_rounding=stochastic, fused_next=fused_next,
                                        exact=ex))
    return out


def compile_passes(cc, variants, jobs=None) -> list:
    """compile_pass for many variants (dicts of its keyword arguments) at once, every result
    cached for the life of the process. Under the interpreter they compile in `jobs`
    subprocesses (default: up to 2 or the number of CPUs)."""
    check_aot_available()
    specs = [_pass_spec(cc, **{"stochastic_rounding": False, "fused_next": False, "exact": False,
                               "fast_math": None, **v}) for v in variants]
    missing = [s for s in dict.fromkeys(specs) if s not in _COMPILED]
    if missing:
        if INTERPRET:
            jobs = jobs or max(1, min(2, os.cpu_count() or 1))
            results = _compile_in_subprocesses(missing, jobs)
        else:
            results = [_compile_here(s) for s in missing]
        _COMPILED.update(zip(missing, results))
    return [_COMPILED[s] for s in specs]


def compile_pass(cc, *, dtype, distribution, update, stochastic_rounding=False, fused_next=False,
                 exact=False, fast_math=None) -> CompiledPass:
    """Compile one pass kernel ahead of time for compute capability `cc` (e.g. 80, 87, 90).

    Exactly as a launch on such a GPU would compile it: the same constexprs (GPU block size),
    launch options (num_warps, no FMA contraction) and argument specialisation (a 16-byte
    aligned table; seeds as i32). No GPU is needed. The result has `.cubin`, `.ptx`, `.block`
    (elements per program), `.num_warps`, `.shared`, `resource_usage()` and `.sass` (the disassembly).
    `fast_math=None` takes the backend's default (FAST_MATH).
    """
    return compile_passes(cc, [dict(dtype=dtype, distribution=distribution, update=update,
                                    stochastic_rounding=stochastic_rounding, fused_next=fused_next,
                                    exact=exact, fast_math=fast_math)])[0]


def check_aot_available() -> None:
    if triton is None:
        raise _IMPORT_ERROR
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:
        raise RuntimeError(f"this Triton has no NVIDIA backend to compile with: {exc}") from exc
