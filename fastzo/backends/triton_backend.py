"""Backend "triton": fused in-place passes, one multi-tensor launch per storage dtype.

Each pass reads and writes every element once. The noise is regenerated in the kernel from the
contract's Philox counters; nothing the size of a weight is allocated. A persistent grid walks a
small device-side table of (address, numel, key, offset) rows, so a model with hundreds of
tensors costs one launch per dtype, not one per tensor.
"""

from __future__ import annotations

import os

import torch

from .. import noise

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
# The interpreter pays per program and per block, not per element: large blocks keep it fast.
BLOCK = 65536 if INTERPRET else 4096
NUM_WARPS = 8


def check_available() -> None:
    if triton is None:
        raise _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)")


def supports_device(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


if triton is not None:

    @triton.jit
    def _philox(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 blocks; identical to fastzo.noise.philox4x32_10."""
        for _ in tl.static_range(10):
            _c0, _c2 = c0, c2
            c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
            c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
            c1 = tl.mul(c2 * 0 + 0xCD9E8D57, _c2, sanitize_overflow=False)
            c3 = tl.mul(c0 * 0 + 0xD2511F53, _c0, sanitize_overflow=False)
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

    @triton.jit
    def _log_uniform24(x):
        """ln u for u = (k + 0.5)·2**-24, k = x >> 8, accurate near u = 1.

        For k ≥ 2**23, k + 0.5 needs 25 bits and float32 rounds u (to 1 at the top), so there
        ln u = ln(k·2**-24) + ln(1 + 0.5/k) ≈ ln(k·2**-24) + 0.5/k, both terms exact enough.
        """
        k = (x >> 8).to(tl.float32)
        direct = tl.log((k + 0.5) * 5.9604644775390625e-08)
        near_one = tl.log(k * 5.9604644775390625e-08) + 0.5 / tl.maximum(k, 1.0)
        return tl.where(k >= 8388608.0, near_one, direct)

    @triton.jit
    def _uniform24(x):
        return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24

    @triton.jit
    def _noise_block(start, key, k0, k1, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr):
        """z for global elements [start, start + BLOCK); start is a multiple of 128."""
        if GAUSSIAN:
            group = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
            x0, x1, x2, x3 = _philox_groups(group, key, 0, k0, k1)
            r_a = tl.sqrt(-2.0 * _log_uniform24(x0))
            r_b = tl.sqrt(-2.0 * _log_uniform24(x2))
            a_a = 6.283185307179586 * _uniform24(x1)
            a_b = 6.283185307179586 * _uniform24(x3)
            z = tl.interleave(
                tl.interleave(r_a * tl.cos(a_a), r_b * tl.cos(a_b)),
                tl.interleave(r_a * tl.sin(a_a), r_b * tl.sin(a_b)),
            )
        else:
            group = start // 128 + tl.arange(0, BLOCK // 128).to(tl.int64)
            x0, x1, x2, x3 = _philox_groups(group, key, 1, k0, k1)
            words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))
            bits = (words[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1
            z = 1.0 - 2.0 * tl.reshape(bits, (BLOCK,)).to(tl.float32)
        return z

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
    def _store(ptrs, y, mask, DTYPE: tl.constexpr):
        if DTYPE == tl.bfloat16:
            bits = _round_bf16_bits(y).to(tl.int16)
            tl.store(ptrs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptrs, y.to(DTYPE), mask=mask)

    @triton.jit
    def _store_stochastic(ptrs, y, rbits, mask, DTYPE: tl.constexpr):
        """The contract's stochastic rounding to a 16-bit format (see docs/noise.md)."""
        IS_BF16: tl.constexpr = DTYPE == tl.bfloat16
        bits = _stochastic_bits(y, rbits, IS_BF16).to(tl.int16)
        tl.store(ptrs, bits.to(DTYPE, bitcast=True), mask=mask)

    @triton.jit
    def _stochastic_bits(y, rbits, IS_BF16: tl.constexpr):
        """Bit pattern (int32 holding 0..0xFFFF) of the contract's stochastic rounding of y."""
        nearest = _nearest_bits(y, IS_BF16)
        y_abs = tl.abs(y)
        toward = tl.where(tl.abs(_to_f32(nearest, IS_BF16)) > y_abs, nearest - 1, nearest)
        sign = tl.where(y < 0, 0x8000, 0)
        away = ((toward & 0x7FFF) + 1) | sign
        t_abs = tl.abs(_to_f32(toward, IS_BF16))
        gap = tl.abs(_to_f32(away, IS_BF16)) - t_abs
        frac = (y_abs - t_abs) / gap
        u = (rbits.to(tl.float32) + 0.5) * 1.52587890625e-05  # 2**-16
        chosen = tl.where(u < frac, away, toward)
        # representable, inf/NaN input, or overflow (the next value away is inf): keep nearest
        not_finite = (y.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
        gap_not_finite = (gap.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
        exact = (_to_f32(toward, IS_BF16) == y) | not_finite | gap_not_finite
        return tl.where(exact, nearest, chosen)

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
    def _rounding_bits(start, key, k0, k1, BLOCK: tl.constexpr):
        group = start // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
        x0, x1, x2, x3 = _philox_groups(group, key, 2, k0, k1)
        words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))
        halves = tl.interleave(words & 0xFFFF, words >> 16)
        return halves.to(tl.int32)

    # Integer scalars equal to 1 would be specialised into constants; seeds and counts must not.
    @triton.jit(do_not_specialize=["n_tensors", "seed_lo", "seed_hi", "next_lo", "next_hi",
                                   "multiple"])
    def _zo_pass_kernel(
        addr_table, numel_table, key_table, offset_table, exponent_table, n_tensors,
        seed_lo, seed_hi, a, decay, b, next_lo, next_hi, a_next, multiple,
        DTYPE: tl.constexpr, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr,
        UPDATE: tl.constexpr, STOCHASTIC: tl.constexpr, NEXT: tl.constexpr,
        EXACT: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MAX_BITS: tl.constexpr,
        INF_BITS: tl.constexpr,
    ):
        """perturb (UPDATE=0):  θ ← θ + a·z
        restore-and-update:    θ ← (θ + a·z)·decay − b·z
        with NEXT, also + a_next·z' where z' is the next step's noise (fused steps)

        EXACT (16-bit, q = 2**exponent per tensor; N = grid index, k(s) = rne(s/q · z)):
        perturb:            θ ← N⁻¹(wrap(N(θ) + multiple·k(a)))
        restore-and-update: θ₀ = N⁻¹(wrap(N(θ) + k(a))), θ ← grid_round(θ₀·decay − (b·z)·r)
                            with r = q / grid spacing at θ₀
        with NEXT, then N⁻¹(wrap(N(θ) + k'(a_next)))
        """
        IS_BF16: tl.constexpr = DTYPE == tl.bfloat16
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        k0 = seed_lo.to(tl.uint32)
        k1 = seed_hi.to(tl.uint32)
        for t in range(n_tensors):
            base = tl.load(addr_table + t).to(tl.pointer_type(DTYPE))
            numel = tl.load(numel_table + t)
            key = tl.load(key_table + t)
            offset = tl.load(offset_table + t)
            lead = offset % 128  # blocks start on a 128-element boundary of the global index
            n_blocks = tl.cdiv(numel + lead, BLOCK)
            if EXACT:
                exponent = tl.load(exponent_table + t).to(tl.int32)
                lq = exponent + (BIAS + MBITS - 1)  # q in units of the smallest subnormal
                t_bits = (lq + 1) << MBITS  # T = q * 2**MBITS
                n_max = (1 << MBITS) + MAX_BITS - t_bits
                inv_q = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
                t_bits32 = (127 + MBITS + exponent) << 23  # T as float32 bits
                a_q = a * inv_q
                a_next_q = a_next * inv_q
            for blk in range(pid, n_blocks, n_programs):
                start = offset - lead + (offset * 0 + blk) * BLOCK  # int64 math: tensors may exceed 2**31
                local = start - offset + tl.arange(0, BLOCK)
                mask = (local >= 0) & (local < numel)
                ptrs = base + local
                if EXACT:
                    raw = tl.load(ptrs, mask=mask, other=0.0)
                    bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                    z = _noise_block(start, key, k0, k1, BLOCK, GAUSSIAN)
                    k = _rne_int(a_q * z)
                    if UPDATE:
                        loaded = bits
                        bits = _step_on_grid(bits, k, lq, t_bits, n_max, MBITS, INF_BITS)
                        # r = q / grid spacing at θ₀: 1 below T, 2**-(E - lq - 1) above
                        mag = bits & 0x7FFF
                        shift = tl.minimum(tl.maximum((mag >> MBITS) - (lq + 1), 0), 126)
                        r = tl.where(mag >= t_bits, ((127 - shift) << 23).to(tl.float32, bitcast=True),
                                     1.0)
                        y = _to_f32(bits, IS_BF16) * decay - (b * z) * r
                        if STOCHASTIC:
                            rbits = _rounding_bits(start, key, k0, k1, BLOCK)
                        else:
                            rbits = bits
                        bits = _round_to_grid(y, rbits, inv_q, t_bits32, lq, t_bits, IS_BF16, MBITS,
                                              STOCHASTIC)
                        if NEXT:
                            z_next = _noise_block(start, key, next_lo.to(tl.uint32),
                                                  next_hi.to(tl.uint32), BLOCK, GAUSSIAN)
                            bits = _step_on_grid(bits, _rne_int(a_next_q * z_next), lq, t_bits, n_max,
                                                 MBITS, INF_BITS)
                        bits = tl.where((loaded & 0x7FFF) < INF_BITS, bits, loaded)  # inf/NaN stay
                    else:
                        bits = _step_on_grid(bits, multiple * k, lq, t_bits, n_max, MBITS, INF_BITS)
                    tl.store(ptrs, bits.to(tl.int16).to(DTYPE, bitcast=True), mask=mask)
                else:
                    theta = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                    z = _noise_block(start, key, k0, k1, BLOCK, GAUSSIAN)
                    if UPDATE:
                        y = (theta + a * z) * decay - b * z
                    else:
                        y = theta + a * z
                    if NEXT:
                        z_next = _noise_block(start, key, next_lo.to(tl.uint32), next_hi.to(tl.uint32),
                                              BLOCK, GAUSSIAN)
                        y = y + a_next * z_next
                    if STOCHASTIC:
                        rbits = _rounding_bits(start, key, k0, k1, BLOCK)
                        _store_stochastic(ptrs, y, rbits, mask, DTYPE)
                    else:
                        _store(ptrs, y, mask, DTYPE)


_TL_DTYPE = {}
if triton is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _n_programs(device: torch.device, total_blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(total_blocks, sms * 8))
    return max(1, min(total_blocks, 4))


_FORMAT_CONSTANTS = {  # MBITS, BIAS, MAX_BITS, INF_BITS (fastzo.noise.FORMATS16)
    dtype: (fmt.mbits, fmt.bias, fmt.max_bits, fmt.inf_bits) for dtype, fmt in noise.FORMATS16.items()
}


def _launch(tensors, keys, offsets, seed, a, decay, b, distribution, update, stochastic,
            next_seed=None, a_next=0.0, exponents=None, multiple=1):
    exact = exponents is not None
    by_dtype: dict[torch.dtype, list[int]] = {}
    for idx, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(idx)
    device = tensors[0].device
    for dtype, idxs in by_dtype.items():
        rows = [[tensors[i].data_ptr() for i in idxs], [tensors[i].numel() for i in idxs],
                [keys[i] for i in idxs], [offsets[i] for i in idxs],
                [exponents[i] if exact else 0 for i in idxs]]
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        total_blocks = sum(-(-(tensors[i].numel() + offsets[i] % 128) // BLOCK) for i in idxs)
        grid = (_n_programs(device, total_blocks),)
        mbits, bias, max_bits, inf_bits = _FORMAT_CONSTANTS.get(dtype, (0, 0, 0, 0))
        options = {}
        if exact and not INTERPRET:
            # no multiply-add contraction: the update rounds like the oracle's separate operations
            options["enable_fp_fusion"] = False
        _zo_pass_kernel[grid](
            table[0], table[1], table[2], table[3], table[4], len(idxs),
            seed & noise.MASK32, seed >> 32, a, decay, b,
            (next_seed or 0) & noise.MASK32, (next_seed or 0) >> 32, a_next, multiple,
            DTYPE=_TL_DTYPE[dtype], BLOCK=BLOCK, GAUSSIAN=distribution == "gaussian",
            UPDATE=update, STOCHASTIC=stochastic and dtype != torch.float32,
            NEXT=next_seed is not None, EXACT=exact, MBITS=mbits, BIAS=bias, MAX_BITS=max_bits,
            INF_BITS=inf_bits, num_warps=NUM_WARPS, **options,
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
