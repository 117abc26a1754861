"""Backend "torch": the oracle's noise applied chunk by chunk. Works on every device.

Temporaries are bounded by ``noise.CHUNK`` elements, never the size of a weight.
"""

from __future__ import annotations

import torch

from .. import noise

NAME = "torch"


def check_available() -> None:
    pass


def supports_device(device: torch.device) -> bool:
    return True


def _chunks(tensor: torch.Tensor, key: int, offset: int, seed: int, distribution: str):
    flat = tensor.view(-1)
    for start, z in noise._noise_chunks(flat.numel(), seed, key, offset, flat.device, distribution):
        yield flat[start:start + z.numel()], z, offset + start


def perturb_(tensors, keys, offsets, seed, scale, distribution):
    for tensor, key, offset in zip(tensors, keys, offsets):
        for part, z, _ in _chunks(tensor, key, offset, seed, distribution):
            part.copy_(part.float() + scale * z)


def restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                        stochastic_rounding, next_seed=None, next_scale=0.0):
    for tensor, key, offset in zip(tensors, keys, offsets):
        sr = stochastic_rounding and tensor.dtype != torch.float32
        for part, z, start in _chunks(tensor, key, offset, seed, distribution):
            y = (part.float() + eps * z) * decay - step * z
            if next_seed is not None:
                z_next = noise.zo_noise(part.numel(), next_seed, key, start, part.device, distribution)
                y = y + next_scale * z_next
            if sr:
                bits = noise.rounding_bits(part.numel(), seed, key, start, part.device)
                part.copy_(stochastic_round(y, bits, part.dtype))
            else:
                part.copy_(y)


_STORAGE_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def stochastic_round(y: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The contract's stochastic rounding of float32 ``y`` to 16-bit ``dtype``."""
    nearest = y.to(dtype)
    toward_zero = torch.where(nearest.float().abs() > y.abs(), _step_toward_zero(nearest), nearest)
    away = _step_away_from_zero(toward_zero, y)
    t_abs = toward_zero.float().abs()
    gap = away.float().abs() - t_abs
    frac = (y.abs() - t_abs) / gap
    u = (bits.to(torch.float32) + 0.5) * 2.0**-16
    out = torch.where(u < frac, away, toward_zero)
    exact = (toward_zero.float() == y) | ~torch.isfinite(y) | ~torch.isfinite(gap)
    return torch.where(exact, nearest, out)


def _step_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit value one ulp closer to zero (x != 0)."""
    bits = x.view(torch.int16).to(torch.int32) & 0xFFFF
    return _from_bits(bits - 1, x.dtype)


def _step_away_from_zero(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The 16-bit value one ulp further from zero than t, on the side of y's sign."""
    bits = t.view(torch.int16).to(torch.int32) & 0xFFFF
    magnitude = (bits & 0x7FFF) + 1
    sign = torch.where(y < 0, 0x8000, 0)
    return _from_bits(magnitude | sign, t.dtype)


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return signed.view(dtype)


def restore_update_and_perturb_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                                stochastic_rounding, next_seed, next_scale):
    restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                        stochastic_rounding, next_seed, next_scale)


# ------------------------------------------------------------------ exact mode (16-bit only)
def _bits_of(part: torch.Tensor) -> torch.Tensor:
    return part.view(torch.int16).to(torch.int64) & 0xFFFF


def _store_bits(part: torch.Tensor, bits: torch.Tensor) -> None:
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    part.copy_(signed.view(part.dtype))


def _step_on_grid(bits: torch.Tensor, steps: torch.Tensor, exponent: int, fmt) -> torch.Tensor:
    """N⁻¹(wrap(N(θ) + steps)); inf and NaN patterns are returned unchanged."""
    finite = (bits & 0x7FFF) < fmt.inf_bits
    index = noise.grid_wrap(noise.grid_index(bits, exponent, fmt) + steps, exponent, fmt)
    return torch.where(finite, noise.grid_bits(index, exponent, fmt), bits)


def round_to_grid(y: torch.Tensor, rbits: torch.Tensor | None, dtype: torch.dtype,
                  exponent: int) -> torch.Tensor:
    """float32 y onto S_q as 16-bit patterns (int64): below T to multiples of q (stochastically
    with the contract's bits, or to nearest even), at or above T the storage rounding."""
    fmt = noise.FORMATS16[dtype]
    threshold = torch.tensor(2.0 ** (exponent + fmt.mbits), dtype=torch.float32)
    below = (y.view(torch.int32) & 0x7FFFFFFF) < threshold.view(torch.int32)
    c = y.abs() * torch.tensor(2.0**-exponent, dtype=torch.float32)
    if rbits is None:
        n = torch.round(c)
        stored = y.to(dtype)
    else:
        whole = torch.trunc(c)
        u = (rbits.to(torch.float32) + 0.5) * 2.0**-16
        n = whole + (u < c - whole).to(torch.float32)
        stored = stochastic_round(y, rbits, dtype)
    n = torch.where(below, n, 0.0).long()  # above T the storage rounding is used instead
    grid = noise.grid_bits(torch.where(y < 0, -n, n), exponent, fmt)
    return torch.where(below, grid, _bits_of(stored))


def exact_perturb_(tensors, keys, offsets, seed, eps, multiple, exponents, distribution):
    for tensor, key, offset, exponent in zip(tensors, keys, offsets, exponents):
        fmt = noise.FORMATS16[tensor.dtype]
        for part, z, _ in _chunks(tensor, key, offset, seed, distribution):
            steps = multiple * noise.exact_steps(z, eps, exponent)
            _store_bits(part, _step_on_grid(_bits_of(part), steps, exponent, fmt))


def exact_restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                              stochastic_rounding, exponents, next_seed=None, next_eps=0.0):
    for tensor, key, offset, exponent in zip(tensors, keys, offsets, exponents):
        fmt = noise.FORMATS16[tensor.dtype]
        for part, z, start in _chunks(tensor, key, offset, seed, distribution):
            loaded = _bits_of(part)
            restored = _step_on_grid(loaded, noise.exact_steps(z, eps, exponent), exponent, fmt)
            theta = torch.where(restored >= 0x8000, restored - 0x10000, restored).to(torch.int16)
            scale = noise.update_scale(restored, exponent, fmt)  # q / grid spacing at θ₀
            y = theta.view(tensor.dtype).float() * decay - (step * z) * scale
            rbits = None
            if stochastic_rounding:
                rbits = noise.rounding_bits(part.numel(), seed, key, start, part.device)
            bits = round_to_grid(y, rbits, tensor.dtype, exponent)
            if next_seed is not None:
                z_next = noise.zo_noise(part.numel(), next_seed, key, start, part.device, distribution)
                bits = _step_on_grid(bits, noise.exact_steps(z_next, next_eps, exponent), exponent, fmt)
            finite = (loaded & 0x7FFF) < fmt.inf_bits
            _store_bits(part, torch.where(finite, bits, loaded))  # inf/NaN weights stay as they are
