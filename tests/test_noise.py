"""The noise contract's oracle: Philox known answers, layout, statistics, validation."""

import math

import pytest
import torch

import fastzo
from fastzo import noise

# Random123 kat_vectors for philox4x32_10.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    out = fastzo.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    assert tuple(out[0].tolist()) == expected


def test_philox_batched_shape():
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS[:1]] * 6, dtype=torch.int64).reshape(2, 3, 4)
    out = fastzo.philox4x32_10(counters, (0, 0))
    assert out.shape == (2, 3, 4)
    assert (out == torch.tensor(KNOWN_ANSWERS[0][2])).all()


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int32),
                                 torch.full((1, 4), 2**32, dtype=torch.int64), torch.full((1, 4), -1, dtype=torch.int64)])
def test_philox_rejects_bad_counters(bad):
    with pytest.raises((TypeError, ValueError)):
        fastzo.philox4x32_10(bad, (0, 0))


def test_philox_rejects_bad_key():
    with pytest.raises(ValueError):
        fastzo.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), (2**32, 0))


def test_gaussian_layout_matches_spec():
    """z(4j + r) from the Box-Muller pairs of Philox call j, spelled out independently."""
    seed, key, j = 2**63 + 12345, 77, 5
    words = fastzo.philox4x32_10(torch.tensor([[j, 0, key, 0]]), (seed & 0xFFFFFFFF, seed >> 32))[0].tolist()
    u = [((w >> 8) + 0.5) / 2**24 for w in words]
    r_a, r_b = math.sqrt(-2 * math.log(u[0])), math.sqrt(-2 * math.log(u[2]))
    expected = [r_a * math.cos(2 * math.pi * u[1]), r_a * math.sin(2 * math.pi * u[1]),
                r_b * math.cos(2 * math.pi * u[3]), r_b * math.sin(2 * math.pi * u[3])]
    z = fastzo.zo_noise(4, seed, key, offset=4 * j)
    assert torch.equal(z, torch.tensor(expected, dtype=torch.float64).float())


def test_rademacher_layout_matches_spec():
    seed, key, j = 99, 3, 2
    words = fastzo.philox4x32_10(torch.tensor([[j, 0, key, 1]]), (seed, 0))[0].tolist()
    expected = [1 - 2 * ((words[(i % 128) // 32] >> (i % 32)) & 1) for i in range(128)]
    z = fastzo.zo_noise(128, seed, key, offset=128 * j, distribution="rademacher")
    assert z.tolist() == expected


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_any_shard_gets_its_slice(distribution, gen):
    full = fastzo.zo_noise(5000, 11, 4, distribution=distribution)
    for _ in range(10):
        a = int(torch.randint(0, 5000, (1,), generator=gen))
        b = int(torch.randint(a, 5001, (1,), generator=gen))
        assert torch.equal(fastzo.zo_noise(b - a, 11, 4, offset=a, distribution=distribution), full[a:b])


def test_large_offsets_use_the_high_counter_word():
    offset = 2**36 + 6
    z = fastzo.zo_noise(8, 5, 1, offset=offset)
    groups = torch.tensor([offset // 4, offset // 4 + 1, offset // 4 + 2])
    counters = torch.stack([groups & 0xFFFFFFFF, groups >> 32, torch.full_like(groups, 1), torch.zeros_like(groups)], -1)
    assert counters[0, 1] == 4  # the high word is really exercised
    words = fastzo.philox4x32_10(counters, (5, 0))
    u = ((words >> 8).double() + 0.5) / 2**24
    ref = torch.stack([torch.sqrt(-2 * torch.log(u[:, 0])) * torch.cos(2 * math.pi * u[:, 1]),
                       torch.sqrt(-2 * torch.log(u[:, 0])) * torch.sin(2 * math.pi * u[:, 1]),
                       torch.sqrt(-2 * torch.log(u[:, 2])) * torch.cos(2 * math.pi * u[:, 3]),
                       torch.sqrt(-2 * torch.log(u[:, 2])) * torch.sin(2 * math.pi * u[:, 3])], -1).reshape(-1)
    assert torch.equal(z, ref[2:10].float())


def test_streams_keys_and_seeds_are_independent():
    base = fastzo.zo_noise(4096, 1, 0)
    for other in (fastzo.zo_noise(4096, 2, 0), fastzo.zo_noise(4096, 1, 1), fastzo.zo_noise(4096, 2**32 + 1, 0)):
        corr = torch.corrcoef(torch.stack([base, other]))[0, 1]
        assert abs(corr) < 0.1
    assert not torch.equal(fastzo.zo_noise(64, 1, 0), fastzo.zo_noise(64, 1, 0, offset=64))


def test_gaussian_statistics():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = fastzo.zo_noise(10**6, 2024, 3).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
    kurtosis = (((z - z.mean()) / z.std()) ** 4).mean().item()
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    assert z.abs().max() < 5.9  # the largest value the uniform's clamp allows
    assert scipy_stats.kstest(z[:200000].numpy(), "norm").pvalue > 1e-4


def test_rademacher_statistics():
    z = fastzo.zo_noise(10**6, 2024, 3, distribution="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    pairs = (z[:-1] * z[1:]).mean().item()  # neighbouring bits uncorrelated
    assert abs(pairs) < 5 / math.sqrt(z.numel())


@pytest.mark.parametrize("kwargs,error", [
    (dict(seed=-1), ValueError), (dict(seed=2**64), ValueError), (dict(seed=1.5), TypeError),
    (dict(key=-1), ValueError), (dict(key=2**32), ValueError), (dict(numel=-3), ValueError),
    (dict(offset=-1), ValueError), (dict(offset=2**62), ValueError),
    (dict(distribution="uniform"), ValueError),
])
def test_zo_noise_rejects_bad_arguments(kwargs, error):
    args = dict(numel=8, seed=0, key=0) | kwargs
    with pytest.raises(error):
        fastzo.zo_noise(**args)


def test_rounding_bits_layout():
    seed, key = 7, 2
    words = fastzo.philox4x32_10(torch.tensor([[1, 0, key, 2]]), (seed, 0))[0].tolist()
    expected = [(words[h // 2] >> (16 * (h % 2))) & 0xFFFF for h in range(8)]
    assert noise.rounding_bits(8, seed, key, offset=8).tolist() == expected
