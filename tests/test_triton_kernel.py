"""The Triton kernel's own paths, in the interpreter: stochastic rounding without the contract's
division over edge bit patterns, fast math's bound, the masked path for misaligned views, and the
host-side table cache."""

import pytest
import torch

import fastzo
from fastzo import noise
from fastzo.backends import torch_backend
from helpers import DEVICE, weights

triton_backend = pytest.importorskip("fastzo.backends.triton_backend")
pytestmark = pytest.mark.skipif("triton" not in fastzo.available_backends()
                                or not triton_backend.supports_device(DEVICE),
                                reason="triton backend unavailable on this device")

if triton_backend.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _stochastic_bits_kernel(y_ptr, r_ptr, out_ptr, N: tl.constexpr, IS_BF16: tl.constexpr):
        i = tl.arange(0, N)
        y = tl.load(y_ptr + i)
        r = tl.load(r_ptr + i)
        tl.store(out_ptr + i, triton_backend._stochastic_bits(y, r, IS_BF16))


def _bits16(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).to(torch.int32) & 0xFFFF


def test_integer_stochastic_rounding_equals_the_contract_on_edge_patterns(gen):
    """bfloat16: "away iff r < low 16 bits of y" (nearest from 0x7F7F0000 on) is the contract's
    float comparison. Random patterns of every kind plus the edges: zero, subnormals, the largest
    finite values, inf, NaN, both signs, and r at, just below and just above the low bits."""
    edges = [0x00000000, 0x00000001, 0x0000FFFF, 0x00010000, 0x007FFFFF, 0x00800000, 0x3F800000,
             0x3F808000, 0x3F80FFFF, 0x7F7EFFFF, 0x7F7F0000, 0x7F7F0001, 0x7F7F7FFF, 0x7F7F8000,
             0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF]
    edges = edges + [e | 0x80000000 for e in edges]
    y_bits, r = [], []
    for e in edges:
        low = e & 0xFFFF
        for rr in {0, max(low - 1, 0), low, min(low + 1, 0xFFFF), 0xFFFF}:
            y_bits.append(e)
            r.append(rr)
    n_random = (1 << 16) - len(y_bits)
    y_bits += torch.randint(0, 2**32, (n_random,), generator=gen, dtype=torch.int64).tolist()
    r += torch.randint(0, 2**16, (n_random,), generator=gen, dtype=torch.int64).tolist()
    y = torch.tensor([b - 2**32 if b >= 2**31 else b for b in y_bits], dtype=torch.int32)
    y = y.view(torch.float32)
    r = torch.tensor(r, dtype=torch.int32)
    out = torch.full_like(r, -1)
    _stochastic_bits_kernel[(1,)](y, r, out, N=1 << 16, IS_BF16=True)
    want = _bits16(torch_backend.stochastic_round(y, r, torch.bfloat16))
    nan = torch.isnan(y)
    assert torch.equal(out[~nan], want[~nan])
    assert ((out[nan] & 0x7FFF) > 0x7F80).all()  # NaN stays NaN


def _float16_threshold(y: torch.Tensor) -> torch.Tensor:
    """The number of r in 0..65535 for which the contract rounds finite y (|y| < 65504) away
    from zero, in float64 (exact): (r + 0.5)·2**-16 < fraction of the float16 gap."""
    y = y.double().abs()
    exponent = torch.floor(torch.log2(torch.where(y > 0, y, torch.ones_like(y)))).clamp(min=-14)
    gap = torch.pow(2.0, exponent - 10)
    fraction = (y - torch.floor(y / gap) * gap) / gap
    return torch.ceil(fraction * 65536 - 0.5).clamp(0, 65536)


def test_float16_stochastic_rounding_equals_the_contract_on_edges_and_thresholds(gen):
    """float16: toward zero by conversion, "u·gap < |y| − |t|" in float32, nearest from 65504 on.
    Edges (zeros, float32 and float16 subnormals, 2**-24 and 2**-14 and their neighbours, the
    largest finite value and the overflow tie at 65520, inf, NaN, both signs) and random
    exponents over the whole float16 range, each with r just below, at and away from the
    contract's threshold (ties included). The exhaustive check of the rule over every float32
    pattern is described in docs/performance.md."""
    edges = [0x00000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x33000000, 0x33000001, 0x337FFFFF,
             0x33800000, 0x33800001, 0x33C00000, 0x387FC000, 0x387FFFFF, 0x38800000, 0x38800001,
             0x38801000, 0x3F800000, 0x3F801000, 0x3F801001, 0x477FDFFF, 0x477FE000, 0x477FE001,
             0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FFFFF, 0x47800000, 0x7F7FFFFF, 0x7F800000,
             0x7F800001, 0x7FC00000, 0x7FFFFFFF]
    edges = torch.tensor(edges + [e | 0x80000000 for e in edges], dtype=torch.int64)
    n = 1 << 16
    exponent = torch.randint(90, 145, (n - len(edges),), generator=gen)
    mantissa = torch.randint(0, 1 << 23, exponent.shape, generator=gen)
    sign = torch.randint(0, 2, exponent.shape, generator=gen) << 31
    y_bits = torch.cat([edges, sign | (exponent << 23) | mantissa])
    y = torch.where(y_bits >= 2**31, y_bits - 2**32, y_bits).to(torch.int32).view(torch.float32)
    threshold = torch.where(torch.isfinite(y), _float16_threshold(y), torch.zeros_like(y.double()))
    offset = torch.randint(-1, 2, (n,), generator=gen)  # just below, at, just above
    r = (threshold + offset).clamp(0, 65535)
    r = torch.where(torch.rand(n, generator=gen) < 0.2,
                    torch.randint(0, 65536, (n,), generator=gen).double(), r).to(torch.int32)
    out = torch.full_like(r, -1)
    _stochastic_bits_kernel[(1,)](y, r, out, N=n, IS_BF16=False)
    want = _bits16(torch_backend.stochastic_round(y, r, torch.float16))
    nan = torch.isnan(y)
    assert torch.equal(out[~nan], want[~nan])
    assert ((out[nan] & 0x7FFF) > 0x7C00).all()  # NaN stays NaN


@pytest.mark.parametrize("fast_math, bound", [(False, 1e-6), (True, 4.5e-6)])
def test_gaussian_z_bound_with_and_without_fast_math(fast_math, bound, monkeypatch):
    """z itself (perturb of zeros by 1) against the float64 oracle. The default polynomials stay
    below 1e-6; fast math's angle reduction is checked here with an accurate sine and cosine (the
    interpreter has no hardware approximations): the hardware's own error, at most 2**-20.5
    absolute on [-pi, pi] per the PTX ISA, adds at most 5.9 * 2**-20.5 = 4.1e-6 on a GPU."""
    monkeypatch.setattr(triton_backend, "FAST_MATH", fast_math)
    n = 278011
    w = torch.zeros(n, dtype=torch.float32, device=DEVICE)
    fastzo.perturb_([w], 0xDEADBEEF12345, 1.0, keys=[11], backend="triton")
    want = noise.zo_noise(n, 0xDEADBEEF12345, 11, distribution="gaussian").to(DEVICE).double()
    err = (w.double() - want).abs().max().item()
    assert err <= bound
    assert 5.9 * 2**-20.5 + 4e-7 < 2e-5  # the stated fast-math bound is inside the contract's


def test_misaligned_views_take_the_masked_path_and_match_the_oracle(gen):
    """Views starting at odd elements (not 16-byte aligned: the masked path) and an aligned view
    with whole blocks (the unmasked 128-bit path) and a partial last block, in one call."""
    block = triton_backend.BLOCK
    base = weights(3 * block + 300, torch.bfloat16, gen)
    ref = base.clone()
    cuts = [(1, 2), (5, 5 + block), (block + 8, 3 * block + 15)]
    args = dict(seed=2024, eps=1e-3, lr=1e-4, projected_grad=0.7, weight_decay=0.1,
                keys=[1, 2, 3], offsets=[0, 7, 0], distribution="rademacher",
                stochastic_rounding=True)
    fastzo.restore_and_update_([base[a:b] for a, b in cuts], backend="triton", **args)
    fastzo.restore_and_update_([ref[a:b] for a, b in cuts], backend="torch", **args)
    assert torch.equal(base, ref)


def test_table_cache_hits_for_the_same_tensors_and_misses_when_one_moves(gen):
    triton_backend._TABLE_CACHE.clear()
    tensors = [weights(n, torch.float32, gen) for n in (5, 300, 4097)]
    ref = [t.clone() for t in tensors]
    stats = triton_backend.table_cache_stats
    hits, misses = stats["hits"], stats["misses"]
    for _ in range(2):
        fastzo.perturb_(tensors, 77, 1e-3, distribution="rademacher", backend="triton")
        fastzo.perturb_(ref, 77, 1e-3, distribution="rademacher", backend="torch")
    assert (stats["hits"] - hits, stats["misses"] - misses) == (1, 1)
    tensors[1] = tensors[1].clone()  # moved: a new address, the cached table must not be used
    fastzo.perturb_(tensors, 78, 1e-3, distribution="rademacher", backend="triton")
    fastzo.perturb_(ref, 78, 1e-3, distribution="rademacher", backend="torch")
    assert stats["misses"] - misses == 2
    for got, want in zip(tensors, ref):
        assert torch.equal(got, want)
    assert len(triton_backend._TABLE_CACHE) <= triton_backend._TABLE_CACHE_SIZE
