"""Every fast backend against the oracle: stored results, shards, round trips, bad input."""

import math

import pytest
import torch

import fastzo
from fastzo import noise
from fastzo.backends import BackendUnavailable
from helpers import DEVICE, DISTRIBUTIONS, DTYPES, SIZES, Z_TOL, fast_backends, ulp, weights

BACKENDS = fast_backends()
EPS = 1e-3

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fast backend on this device")


def oracle_z(n, seed, key, distribution, offset=0):
    return fastzo.zo_noise(n, seed, key, offset=offset, distribution=distribution).to(DEVICE)


def assert_close_to_oracle(got, want_f32, dtype, distribution, scale_of_z):
    """Stored results agree with the oracle's float32 result rounded to the storage dtype.

    Rademacher z is exact, so the stored bits must match. Gaussian z may differ by Z_TOL, which
    can move a float32 result by |scale|*Z_TOL and a 16-bit result by at most one ulp.
    """
    want = want_f32.to(dtype)
    if distribution == "rademacher":
        assert torch.equal(got, want)
        return
    diff = (got.double() - want.double()).abs()
    if dtype == torch.float32:
        tol = scale_of_z * Z_TOL + ulp(want_f32, torch.float32)
        assert (diff <= tol).all(), f"max diff {diff.max().item()}"
    else:
        shift = scale_of_z * Z_TOL  # where a result cancels to near zero, z's error dominates
        assert (diff <= ulp(want_f32.abs() + shift, dtype) * 1.01 + shift).all()
        assert (diff > 0).double().mean() < 0.01  # differences are rare boundary cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_perturb_matches_oracle(backend, distribution, dtype, n, gen):
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=gen)) * 2 + 1
    key = int(torch.randint(0, 2**32 - 1, (1,), generator=gen))
    w = weights(n, dtype, gen)
    z = oracle_z(n, seed, key, distribution)
    want = w.float() + torch.tensor(-2 * EPS, dtype=torch.float32) * z
    fastzo.perturb_([w], seed, -2 * EPS, keys=[key], distribution=distribution, backend=backend)
    assert_close_to_oracle(w, want, dtype, distribution, 2 * EPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 4097, 278011])
def test_restore_and_update_matches_oracle(backend, distribution, dtype, n, gen):
    seed, key, lr, g, wd = 1234567, 9, 1e-2, 0.75, 0.1
    w = weights(n, dtype, gen)
    z = oracle_z(n, seed, key, distribution)
    decay = fastzo.ops.as_float32(1 - lr * wd, "decay")
    step = fastzo.ops.as_float32(lr * g, "step")
    want = (w.float() + EPS * z) * decay - step * z
    fastzo.restore_and_update_([w], seed, EPS, lr, g, wd, keys=[key], distribution=distribution,
                               stochastic_rounding=False, backend=backend)
    assert_close_to_oracle(w, want, dtype, distribution, EPS + step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_matches_oracle_bitwise(backend, dtype, gen):
    """Rademacher z is exact, so every backend must choose the same neighbour as the oracle."""
    w = weights(278011, dtype, gen)
    ref = w.clone()
    args = dict(seed=31337, eps=EPS, lr=1e-4, projected_grad=0.3, keys=[5], distribution="rademacher",
                stochastic_rounding=True)
    fastzo.restore_and_update_([w], backend=backend, **args)
    fastzo.restore_and_update_([ref], backend="torch", **args)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_below_one_ulp(backend, dtype):
    """An update of 1 % of an ulp is lost by round-to-nearest but kept on average by SR."""
    n = 200000
    w = torch.full((n,), 0.75, dtype=dtype, device=DEVICE)
    unit = ulp(torch.tensor(0.75), dtype).item()
    lr = 0.01 * unit  # with g = -1, Rademacher z: intended change ±0.01 ulp per element
    sr = w.clone()
    fastzo.restore_and_update_([sr], 5, 0.0, lr, -1.0, keys=[0], distribution="rademacher",
                               stochastic_rounding=True, backend=backend)
    nearest = w.clone()
    fastzo.restore_and_update_([nearest], 5, 0.0, lr, -1.0, keys=[0], distribution="rademacher",
                               stochastic_rounding=False, backend=backend)
    z = oracle_z(n, 5, 0, "rademacher")
    intended = (lr * z).double()
    applied = sr.double() - 0.75
    assert torch.equal(nearest, w)  # round-to-nearest drops every update
    ratio = (applied * z.double()).mean() / (intended * z.double()).mean()
    assert abs(ratio.item() - 1) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_shards_equal_the_whole_tensor(backend, distribution, gen):
    n = 70001
    w = weights(n, torch.float32, gen)
    whole = w.clone()
    fastzo.perturb_([whole], 42, EPS, keys=[3], distribution=distribution, backend=backend)
    cuts = sorted({int(c) for c in torch.randint(1, n, (3,), generator=gen)} | {129, 130})
    bounds = [0, *cuts, n]
    shards = [w[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]
    for shard, a in zip(shards, bounds[:-1]):
        fastzo.perturb_([shard], 42, EPS, keys=[3], offsets=[a], distribution=distribution, backend=backend)
    assert torch.equal(torch.cat(shards), whole)


@pytest.mark.parametrize("block", [128, 1024, 65536])
def test_triton_output_does_not_depend_on_block_size(block, monkeypatch, gen):
    if "triton" not in BACKENDS:
        pytest.skip("triton backend unavailable")
    from fastzo.backends import triton_backend

    w = weights(10007, torch.float32, gen)
    ref = w.clone()
    fastzo.perturb_([ref], 8, EPS, backend="triton")
    monkeypatch.setattr(triton_backend, "BLOCK", block)
    fastzo.perturb_([w], 8, EPS, backend="triton")
    assert torch.equal(w, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tensor_call_equals_one_call_per_tensor(backend, gen):
    tensors = [weights(n, dt, gen) for n, dt in [(5, torch.float32), (4097, torch.bfloat16),
                                                 (1, torch.float16), (3000, torch.float32)]]
    singles = [t.clone() for t in tensors]
    keys = [10, 2, 7, 4]
    fastzo.perturb_(tensors, 99, EPS, keys=keys, backend=backend)
    for t, k in zip(singles, keys):
        fastzo.perturb_([t], 99, EPS, keys=[k], backend=backend)
    for a, b in zip(tensors, singles):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bound(backend, dtype, gen):
    """+eps, -2 eps, +eps: three round-to-nearest stores, so at most 1.5 ulp of the largest
    intermediate magnitude |θ| + 2 eps |z| (stated in the README)."""
    n = 4097
    w = weights(n, dtype, gen)
    start = w.clone()
    for scale in (EPS, -2 * EPS, EPS):
        fastzo.perturb_([w], 5, scale, backend=backend)
    z = oracle_z(n, 5, 0, "gaussian")
    bound = 1.5 * ulp(start.double().abs() + 2 * EPS * z.double().abs(), dtype)
    err = (w.double() - start.double()).abs()
    assert (err <= bound * 1.0001).all()
    if dtype == torch.float32:
        assert (err == 0).double().mean() > 0.4  # most elements come back bit-exact


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_keys_default_to_list_order(backend, gen):
    a, b = weights(100, torch.float32, gen), weights(50, torch.float32, gen)
    a2, b2 = a.clone(), b.clone()
    fastzo.perturb_([a, b], 3, EPS, backend=backend)
    fastzo.perturb_([a2, b2], 3, EPS, keys=[0, 1], backend=backend)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_multidimensional_tensors_use_row_major_index(gen):
    w = weights(12 * 34, torch.float32, gen).reshape(12, 34)
    flat = w.reshape(-1).clone()
    fastzo.perturb_([w], 1, EPS, backend=BACKENDS[0])
    fastzo.perturb_([flat], 1, EPS, backend=BACKENDS[0])
    assert torch.equal(w.reshape(-1), flat)


def test_parameters_that_require_grad_are_accepted(gen):
    p = torch.nn.Parameter(weights(64, torch.float32, gen))
    before = p.detach().clone()
    fastzo.perturb_([p], 1, EPS)
    assert not torch.equal(p.detach(), before)


def test_empty_inputs_are_no_ops():
    fastzo.perturb_([], 1, EPS)
    e = torch.empty(0, device=DEVICE)
    fastzo.restore_and_update_([e], 1, EPS, 1e-3, 1.0)


def test_unknown_or_unavailable_backend_says_why():
    with pytest.raises(ValueError, match="unknown backend"):
        fastzo.perturb_([torch.ones(3)], 0, EPS, backend="opencl")
    missing = [b for b in ("triton", "cuda", "cpp") if b not in fastzo.available_backends()]
    for name in missing:
        with pytest.raises(BackendUnavailable, match=name):
            fastzo.perturb_([torch.ones(3)], 0, EPS, backend=name)


def test_available_backends_is_ordered_and_has_the_oracle():
    names = fastzo.available_backends()
    assert names[-1] == "torch"
    order = ["triton", "cuda", "cpp", "torch"]
    assert names == [b for b in order if b in names]


BAD_CALLS = [
    ("integer tensor", lambda w: ([w, torch.ones(3, dtype=torch.int32)], {}), TypeError),
    ("bool tensor", lambda w: ([w, torch.ones(3, dtype=torch.bool)], {}), TypeError),
    ("float64 tensor", lambda w: ([w, torch.ones(3, dtype=torch.float64)], {}), TypeError),
    ("non-contiguous", lambda w: ([w, torch.ones(4, 8)[:, ::2]], {}), ValueError),
    ("same tensor twice", lambda w: ([w, w], {}), ValueError),
    ("NaN scale", lambda w: ([w], {"scale": math.nan}), ValueError),
    ("inf scale", lambda w: ([w], {"scale": math.inf}), ValueError),
    ("scale overflows float32", lambda w: ([w], {"scale": 1e39}), ValueError),
    ("negative seed", lambda w: ([w], {"seed": -1}), ValueError),
    ("seed above uint64", lambda w: ([w], {"seed": 2**64}), ValueError),
    ("float seed", lambda w: ([w], {"seed": 1.0}), TypeError),
    ("too few keys", lambda w: ([w, w.clone()], {"keys": [0]}), ValueError),
    ("repeated keys", lambda w: ([w, w.clone()], {"keys": [1, 1]}), ValueError),
    ("key above uint32", lambda w: ([w], {"keys": [2**32]}), ValueError),
    ("bad distribution", lambda w: ([w], {"distribution": "cauchy"}), ValueError),
    ("negative offset", lambda w: ([w], {"offsets": [-1]}), ValueError),
]


@pytest.mark.parametrize("name,make,error", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_leaves_tensors_untouched(name, make, error, gen):
    w = weights(1000, torch.float32, gen).cpu()
    before = w.clone()
    tensors, overrides = make(w)
    snapshot = [t.clone() for t in tensors]
    kwargs = dict(seed=1, scale=EPS) | overrides
    with pytest.raises(error):
        fastzo.perturb_(tensors, kwargs.pop("seed"), kwargs.pop("scale"), **kwargs)
    assert torch.equal(w, before)
    for t, s in zip(tensors, snapshot):
        assert torch.equal(t, s)


def test_bad_update_arguments_raise_before_touching(gen):
    w = weights(100, torch.float32, gen)
    before = w.clone()
    for kwargs in (dict(lr=math.nan), dict(projected_grad=math.inf), dict(weight_decay=math.nan),
                   dict(eps=math.inf)):
        args = dict(seed=1, eps=EPS, lr=1e-3, projected_grad=1.0) | kwargs
        with pytest.raises(ValueError):
            fastzo.restore_and_update_([w], **args)
    assert torch.equal(w, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_tensors_on_two_devices_are_refused():
    a, b = torch.ones(3), torch.ones(3, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        fastzo.perturb_([a, b], 1, EPS)
    assert (a == 1).all() and (b == 1).all()


def test_noise_is_the_same_on_every_backend_for_rademacher(gen):
    w = weights(5000, torch.float32, gen)
    results = []
    for backend in BACKENDS + ["torch"]:
        t = w.clone()
        fastzo.perturb_([t], 17, 0.5, distribution="rademacher", backend=backend)
        results.append(t)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    assert noise.STREAM_RADEMACHER == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_is_accurate_where_the_uniform_is_nearest_one(backend):
    """k = x >> 8 close to 2**24: float32 cannot hold (k + 0.5)·2**-24, so a backend that forms
    u in float32 returns z = 0 there. Find such elements with the oracle and check them."""
    seed, groups = 3, torch.arange(0, 2**21, dtype=torch.int64)
    words = fastzo.philox4x32_10(noise.counters_for(groups, 0, noise.STREAM_GAUSSIAN), noise.split_seed(seed))
    hits = groups[(words[:, 0] >> 8) >= 2**24 - 64][:4].tolist()
    assert hits, "no element near u = 1 in the scanned range"
    for j in hits:
        w = torch.zeros(4, device=DEVICE)
        fastzo.perturb_([w], seed, 1.0, offsets=[4 * j], backend=backend)
        want = oracle_z(4, seed, 0, "gaussian", offset=4 * j)
        assert (w - want).abs().max() <= Z_TOL, (j, w, want)
