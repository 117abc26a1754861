"""The native backends: "cpp" (CPU kernels of fastzo._C) against the oracle, "cuda" on a GPU,
and the fallback when the extension is missing."""

import ctypes
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastzo
from fastzo import backends, noise
from fastzo.backends import BackendUnavailable
from helpers import DISTRIBUTIONS, DTYPES, SIZES, Z_TOL, ulp

HAS_CPP = "cpp" in fastzo.available_backends()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastzo._C is not built")
EPS = 1e-3

KNOWN_ANSWERS = [  # Random123 kat_vectors, as in docs/noise.md
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@functools.lru_cache(maxsize=16)
def oracle_noise(n, seed, key, offset, distribution):
    """The oracle's z, computed once per argument set (read-only: callers must not modify it)."""
    return fastzo.zo_noise(n, seed, key, offset=offset, distribution=distribution)


def _C():
    return backends.get_backend("cpp").load_extension()


def random_weights(n, dtype, gen, std=0.02):
    return (torch.randn(n, generator=gen) * std).to(dtype)


def assert_stored_like_oracle(got, want_f32, distribution, scale_of_z):
    """Rademacher: the bits of the oracle's float32 result rounded to nearest. Gaussian: within
    what a z error of Z_TOL can do (float32), or one ulp on rare rounding boundaries (16-bit)."""
    want = want_f32.to(got.dtype)
    if distribution == "rademacher":
        assert torch.equal(got, want)
        return
    diff = (got.double() - want.double()).abs()
    if got.dtype == torch.float32:
        assert (diff <= scale_of_z * Z_TOL + ulp(want_f32, torch.float32)).all(), diff.max()
    else:
        shift = scale_of_z * Z_TOL
        assert (diff <= ulp(want_f32.abs() + shift, got.dtype) * 1.01 + shift).all(), diff.max()
        assert (diff > 0).double().mean() < 0.01


# --- the extension itself -------------------------------------------------------------------

def test_extension_is_built_when_the_build_is_strict():
    """CI builds with FASTZO_STRICT_BUILD=1: there the backend must exist, not be skipped."""
    if os.environ.get("FASTZO_STRICT_BUILD") != "1":
        pytest.skip("FASTZO_STRICT_BUILD is not set")
    assert HAS_CPP, backends._errors.get("cpp")


@needs_cpp
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    out = _C().philox4x32_10(torch.tensor([counter], dtype=torch.int64), *key)
    assert tuple(out[0].tolist()) == expected


@needs_cpp
def test_philox_words_equal_the_oracle(gen):
    counters = torch.randint(0, 2**32, (4096, 4), generator=gen, dtype=torch.int64)
    key = tuple(int(k) for k in torch.randint(0, 2**32, (2,), generator=gen, dtype=torch.int64))
    assert torch.equal(_C().philox4x32_10(counters, *key), noise.philox4x32_10(counters, key))


@needs_cpp
def test_extension_checks_its_input():
    C = _C()
    with pytest.raises(RuntimeError, match="int64"):
        C.philox4x32_10(torch.zeros(2, 4, dtype=torch.int32), 0, 0)
    w = torch.ones(10)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.cpu_perturb_([w, torch.ones(4, 4).t()], [0, 1], [0, 0], 1, 0.5, "gaussian")
    with pytest.raises(RuntimeError, match="twice"):
        C.cpu_perturb_([w, torch.ones(3)], [4, 4], [0, 0], 1, 0.5, "gaussian")
    with pytest.raises(RuntimeError, match="distribution"):
        C.cpu_perturb_([w], [0], [0], 1, 0.5, "uniform")
    assert torch.equal(w, torch.ones(10))  # checked before anything was written


# --- noise and stored results against the oracle ---------------------------------------------

@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", [0, 2**35 + 3])
def test_noise_matches_the_oracle(distribution, n, offset):
    """Perturbing zeros by 1.0 stores z itself."""
    seed, key = 2**64 - 12345, 2**32 - 7
    w = torch.zeros(n)
    fastzo.perturb_([w], seed, 1.0, keys=[key], offsets=[offset], distribution=distribution,
                    backend="cpp")
    z = oracle_noise(n, seed, key, offset, distribution)
    if distribution == "rademacher":
        assert torch.equal(w, z)
    else:
        assert (w - z).abs().max().item() <= Z_TOL


@needs_cpp
def test_gaussian_is_accurate_near_u_equal_one():
    """x >> 8 close to 2^24 - 1 (u close to 1, small radius) is where a float32 u would round
    away 2^-25 and miss the 2e-5 tolerance; find such Philox calls and check them."""
    seed, key, n_groups = 3, 1, 1 << 19
    counters = noise.counters_for(torch.arange(n_groups), key, noise.STREAM_GAUSSIAN)
    words = noise.philox4x32_10(counters, noise.split_seed(seed))
    near_one = ((words[:, 0] >> 8) >= 2**24 - 256) | ((words[:, 2] >> 8) >= 2**24 - 256)
    groups = near_one.nonzero().flatten().tolist()
    assert groups, "no Philox call with u near 1 in the sample"
    for g in groups[:20]:
        w = torch.zeros(4)
        fastzo.perturb_([w], seed, 1.0, keys=[key], offsets=[4 * g], backend="cpp")
        z = fastzo.zo_noise(4, seed, key, offset=4 * g)
        assert (w - z).abs().max().item() <= 1e-6


@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_perturb_stores_the_oracle_result(distribution, dtype, n, gen):
    seed = 2**64 - 2**40 + n  # fixed per size: the oracle's z is shared by the three dtypes
    w = random_weights(n, dtype, gen)
    z = oracle_noise(n, seed, 11, 7, distribution)
    want = w.float() + torch.tensor(-2 * EPS, dtype=torch.float32) * z
    fastzo.perturb_([w], seed, -2 * EPS, keys=[11], offsets=[7], distribution=distribution,
                    backend="cpp")
    assert_stored_like_oracle(w, want, distribution, 2 * EPS)


@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_and_update_stores_the_oracle_result(distribution, dtype, gen):
    n, seed, key, lr, g, wd = 4097, 99, 4, 1e-2, -0.5, 0.1
    w = random_weights(n, dtype, gen)
    z = fastzo.zo_noise(n, seed, key, distribution=distribution)
    decay = fastzo.ops.as_float32(1 - lr * wd, "decay")
    step = fastzo.ops.as_float32(lr * g, "step")
    want = (w.float() + EPS * z) * decay - step * z
    fastzo.restore_and_update_([w], seed, EPS, lr, g, wd, keys=[key], distribution=distribution,
                               stochastic_rounding=False, backend="cpp")
    assert_stored_like_oracle(w, want, distribution, EPS + abs(step))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_16bit_stores_equal_the_torch_backend_bitwise(dtype, stochastic_rounding, gen):
    """Rademacher z is exact, so the stored bits must be the torch backend's, for both rounding
    modes, over the whole range: subnormals, zeros, overflow to inf, inf and NaN."""
    n = 65536
    low, high = (-30, 17) if dtype == torch.float16 else (-140, 128)
    magnitude = torch.exp2(torch.empty(n).uniform_(low, high, generator=gen))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    w = (magnitude * sign).to(dtype)
    w[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0])
    if dtype == torch.float16:
        w[6:10] = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8])  # largest finite, subnormals
    else:
        w[6:10] = torch.tensor([3.38e38, -3.38e38, 1e-40, -1e-40])
    ref = w.clone()
    # decay > 1 pushes the largest values over the format's range; the step moves small ones.
    args = dict(seed=7, eps=3e-3, lr=1e-3, projected_grad=0.37, weight_decay=-80.0, keys=[2],
                distribution="rademacher", stochastic_rounding=stochastic_rounding)
    fastzo.restore_and_update_([w], backend="cpp", **args)
    fastzo.restore_and_update_([ref], backend="torch", **args)
    nan = ref.isnan()
    assert torch.equal(w.isnan(), nan)
    assert torch.equal(w[~nan].view(torch.int16), ref[~nan].view(torch.int16))
    assert w.isinf().sum() > 2  # the overflow really happened


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_equals_the_torch_backend(dtype, gen):
    w = random_weights(100003, dtype, gen)
    ref = w.clone()
    args = dict(seed=31337, eps=EPS, lr=1e-4, projected_grad=0.3, keys=[5], offsets=[1000003],
                distribution="rademacher", stochastic_rounding=True)
    fastzo.restore_and_update_([w], backend="cpp", **args)
    fastzo.restore_and_update_([ref], backend="torch", **args)
    assert torch.equal(w, ref)


@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_step_equals_the_torch_backend(distribution, dtype, gen):
    """restore-and-update then + next_scale z(next_seed), rounded once, as the torch backend."""
    w = random_weights(20011, dtype, gen)
    ref = w.clone()
    args = dict(seed=12, eps=EPS, lr=1e-3, projected_grad=-0.8, weight_decay=0.01, next_seed=13,
                next_scale=EPS, keys=[1], offsets=[3], distribution=distribution,
                stochastic_rounding=True)
    fastzo.restore_update_and_perturb_([w], backend="cpp", **args)
    fastzo.restore_update_and_perturb_([ref], backend="torch", **args)
    if distribution == "rademacher":
        assert torch.equal(w, ref)
    else:
        assert_stored_like_oracle(w, ref.float(), distribution, 3 * EPS)


# --- invariances -----------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_shards_equal_the_whole_tensor(distribution, gen):
    n = 70001
    w = random_weights(n, torch.float32, gen)
    whole = w.clone()
    fastzo.perturb_([whole], 42, EPS, keys=[3], distribution=distribution, backend="cpp")
    cuts = sorted({int(c) for c in torch.randint(1, n, (4,), generator=gen)} | {129, 16384, 16389})
    bounds = [0, *cuts, n]
    shards = [w[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]
    for shard, a in zip(shards, bounds[:-1]):
        fastzo.perturb_([shard], 42, EPS, keys=[3], offsets=[a], distribution=distribution,
                        backend="cpp")
    assert torch.equal(torch.cat(shards), whole)


@needs_cpp
def test_multi_tensor_call_equals_one_call_per_tensor(gen):
    sizes = [1, 3, 128, 1000, 16385, 40000, 7]
    dtypes = [DTYPES[i % 3] for i in range(len(sizes))]
    tensors = [random_weights(n, dt, gen) for n, dt in zip(sizes, dtypes)]
    keys = [9, 2, 2**32 - 1, 0, 5, 77, 13]
    offsets = [0, 2**40 + 1, 5, 0, 16383, 3, 2**62 - 7]
    singles = [t.clone() for t in tensors]
    args = dict(seed=2**63, eps=EPS, lr=1e-3, projected_grad=2.0, stochastic_rounding=True)
    fastzo.restore_and_update_(tensors, keys=keys, offsets=offsets, backend="cpp", **args)
    for t, k, o in zip(singles, keys, offsets):
        fastzo.restore_and_update_([t], keys=[k], offsets=[o], backend="cpp", **args)
    for a, b in zip(tensors, singles):
        assert torch.equal(a, b)


@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_result_does_not_depend_on_the_thread_count(distribution, dtype, gen):
    """1, 2 and 3 threads give the same bits, and the passes really ran on that many threads
    (19 chunks of work here, so every thread gets some)."""
    if not _C().CPU_OPENMP:
        pytest.skip("fastzo._C was built without OpenMP (torch without OpenMP or FASTZO_NO_OPENMP)")
    w = random_weights(300007, dtype, gen)
    results, used = [], []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            t = w.clone()
            fastzo.perturb_([t], 5, EPS, distribution=distribution, backend="cpp")
            used.append(_C().cpu_last_pass_threads())
            fastzo.restore_and_update_([t], 5, 0.5 * EPS, 1e-3, 0.1, distribution=distribution,
                                       backend="cpp", stochastic_rounding=True)
            used.append(_C().cpu_last_pass_threads())
            fastzo.restore_and_update_([t], 5, 0.5 * EPS, 1e-3, 0.1, distribution=distribution,
                                       backend="cpp", stochastic_rounding=False)
            results.append(t)
    finally:
        torch.set_num_threads(threads)
    assert used == [1, 1, 2, 2, 3, 3]
    assert not torch.equal(results[0], w)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_cpp
def test_passes_are_parallel_where_torch_is():
    """With torch's OpenMP build (the Linux wheels) the extension must be compiled with OpenMP
    too, and share torch's runtime rather than load a second one."""
    if not torch.backends.openmp.is_available():
        pytest.skip("torch uses its native thread pool")
    if os.environ.get("FASTZO_NO_OPENMP", "0") not in ("", "0"):
        pytest.skip("FASTZO_NO_OPENMP is set")
    assert _C().CPU_OPENMP, "fastzo._C was compiled without -fopenmp: its passes use one thread"
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps
                        if "libgomp" in line or "libiomp" in line or "libomp" in line}
        assert len(runtimes) == 1, runtimes


@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_round_trip(distribution, gen):
    """+eps, -2 eps, +eps returns float32 weights to within float32 rounding of the steps,
    exactly as the torch backend does for Rademacher z."""
    w0 = random_weights(70001, torch.float32, gen)
    w, ref = w0.clone(), w0.clone()
    for scale in (EPS, -2 * EPS, EPS):
        fastzo.perturb_([w], 5, scale, distribution=distribution, backend="cpp")
        fastzo.perturb_([ref], 5, scale, distribution=distribution, backend="torch")
    z = fastzo.zo_noise(w0.numel(), 5, 0, distribution=distribution)
    bound = 2 * ulp(w0.abs() + 2 * EPS * z.abs(), torch.float32)
    assert ((w.double() - w0.double()).abs() <= bound).all()
    if distribution == "rademacher":
        assert torch.equal(w, ref)


@needs_cpp
def test_bad_input_leaves_tensors_untouched(gen):
    w = random_weights(1000, torch.float32, gen)
    before = w.clone()
    bad_calls = [
        dict(tensors=[w, torch.ones(4, 8)[:, ::2]]),         # not dense
        dict(tensors=[w, torch.ones(3, dtype=torch.int32)]),  # not a float dtype
        dict(tensors=[w, w]),                                 # the same tensor twice
        dict(tensors=[w, torch.ones(3)], keys=[1, 1]),        # duplicate keys
        dict(tensors=[w], offsets=[-1]),
        dict(tensors=[w], seed=2**64),
        dict(tensors=[w], distribution="uniform"),
    ]
    for call in bad_calls:
        kwargs = {"seed": 1, **call}
        with pytest.raises((TypeError, ValueError)):
            fastzo.perturb_(kwargs.pop("tensors"), kwargs.pop("seed"), EPS, backend="cpp", **kwargs)
        assert torch.equal(w, before)


@needs_cpp
def test_in_place_writes_bump_the_version_counter():
    """As for any in-place op, so autograd notices a saved tensor that was perturbed."""
    w = torch.zeros(10)
    version = w._version
    fastzo.perturb_([w], 1, EPS, backend="cpp")
    fastzo.restore_and_update_([w], 1, EPS, 1e-3, 0.5, backend="cpp")
    assert w._version >= version + 2


# --- dispatch and fallback -------------------------------------------------------------------

def test_available_backends_reflect_the_build():
    names = fastzo.available_backends()
    try:
        from fastzo import _C
    except ImportError:
        assert "cpp" not in names and "cuda" not in names
        return
    assert "cpp" in names
    assert ("cuda" in names) == (bool(_C.HAS_CUDA) and torch.cuda.is_available())


@needs_cpp
def test_cpu_dispatch_picks_cpp_without_the_triton_interpreter(monkeypatch):
    if "triton" in fastzo.available_backends():
        from fastzo.backends import triton_backend
        monkeypatch.setattr(triton_backend, "INTERPRET", False)
    assert backends.pick_backend(torch.device("cpu")) == "cpp"


@pytest.fixture
def extension_missing(monkeypatch):
    """fastzo._C cannot be imported; the registry and cpp_backend are loaded afresh."""
    monkeypatch.setitem(sys.modules, "fastzo._C", None)  # import raises ImportError
    if hasattr(fastzo, "_C"):
        monkeypatch.delattr(fastzo, "_C")
    for name in ("cpp_backend", "cuda_backend"):
        module = f"fastzo.backends.{name}"
        if module in sys.modules:
            monkeypatch.delitem(sys.modules, module)
            monkeypatch.setattr(backends, name, getattr(backends, name, None), raising=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_errors", {})


def test_missing_extension_falls_back_and_says_why(extension_missing, gen):
    assert "cpp" not in fastzo.available_backends()
    assert "cuda" not in fastzo.available_backends()
    w = random_weights(100, torch.float32, gen)
    with pytest.raises(BackendUnavailable, match="fastzo._C is not available") as info:
        fastzo.perturb_([w], 1, EPS, backend="cpp")
    assert isinstance(info.value.__cause__, ImportError)
    assert isinstance(info.value.__cause__.__cause__, ImportError)  # the original import error
    with pytest.raises(BackendUnavailable, match="cuda"):
        fastzo.perturb_([w], 1, EPS, backend="cuda")
    ref = w.clone()
    fastzo.perturb_([w], 1, EPS)  # dispatch falls back to another backend
    fastzo.perturb_([ref], 1, EPS, backend="torch")
    assert (w - ref).abs().max() <= EPS * Z_TOL + 1e-7


def test_import_without_the_extension_in_a_fresh_process():
    code = (
        "import sys; sys.modules['fastzo._C'] = None\n"
        "import torch, fastzo\n"
        "assert 'cpp' not in fastzo.available_backends()\n"
        "w = torch.zeros(10); fastzo.perturb_([w], 1, 1.0)\n"
        "assert torch.equal(w, fastzo.zo_noise(10, 1, 0))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the plain CPU path: torch backend
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- the CUDA kernel, emulated on the CPU ------------------------------------------------------

CSRC = Path(__file__).resolve().parents[1] / "csrc"
STORAGE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emulated_cuda_kernel(tmp_path_factory):
    """csrc/cuda_emulation.cpp built with the host compiler: the CUDA kernel's exact code, run
    thread by thread on the CPU (host math with the device's fused Box-Muller polynomial steps,
    so bit-identical to backend "cpp" in its vector variants)."""
    source = CSRC / "cuda_emulation.cpp"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not source.exists() or compiler is None:
        pytest.skip("needs the csrc sources and a C++ compiler")
    library = tmp_path_factory.mktemp("emulation") / "cuda_emulation.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off",
                    "-fno-math-errno", "-Wno-unknown-pragmas", str(source), "-o", str(library)],
                   check=True)
    run = ctypes.CDLL(str(library)).fastzo_emulate_pass
    run.restype = ctypes.c_int
    run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                    ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_float,
                    ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                    ctypes.c_int]

    def launch(tensors, keys, offsets, seed, distribution, *, update=False, a=0.0, decay=1.0,
               b=0.0, stochastic=False, next_seed=None, a_next=0.0, fast_math=False, blocks=3,
               threads=32):
        """Like the host launcher: one emulated launch per dtype over a table of its tensors."""
        for dtype, code in STORAGE_CODE.items():
            rows = [[t.data_ptr(), t.numel(), k, o, 0]
                    for t, k, o in zip(tensors, keys, offsets) if t.dtype == dtype and t.numel()]
            if not rows:
                continue
            table = torch.tensor(rows, dtype=torch.int64)
            status = run(table.data_ptr(), len(rows), code, distribution == "gaussian", update,
                         stochastic, next_seed is not None, seed, next_seed or 0, a, decay, b,
                         a_next, fast_math, blocks, threads)
            assert status == 0

    return launch


def skip_gaussian_on_the_scalar_variant(distribution):
    """The scalar CPU variant computes the Box-Muller polynomials without FMA, so its Gaussian z
    differ from the device's (and the emulation's) by a few ulps (docs/native.md)."""
    if distribution == "gaussian" and _C().cpu_kernel_isa() == "scalar":
        pytest.skip("Gaussian z of the scalar CPU variant are not the device's bits")


def _awkward_views(gen, dtype):
    """Tensors of one call: misaligned views, sizes below one vector, offsets of every residue."""
    base = random_weights(40000, dtype, gen)
    views = [base[0:1], base[1:4], base[5:13], base[16:9000], base[9003:9004], base[9011:30000],
             base[30001:40000]]
    keys = [3, 1, 2**32 - 1, 7, 0, 11, 5]
    offsets = [0, 5, 2**33 + 6, 3, 127, 16381, 2**62 - 10000]
    return views, keys, offsets


@needs_cpp
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["perturb", "update", "stochastic", "fused"])
def test_emulated_cuda_kernel_equals_cpp(emulated_cuda_kernel, kind, dtype, distribution, gen):
    skip_gaussian_on_the_scalar_variant(distribution)
    views, keys, offsets = _awkward_views(gen, dtype)
    mixed = [v.clone() for v in views]
    mixed[2] = mixed[2].float() if dtype != torch.float32 else mixed[2].half()  # a second dtype
    expected = [v.clone() for v in mixed]
    seed, next_seed, lr, g, wd = 2**64 - 3, 17, 1e-3, 0.6, 0.05
    decay = fastzo.ops.as_float32(1 - lr * wd, "decay")
    step = fastzo.ops.as_float32(lr * g, "step")
    common = dict(keys=keys, offsets=offsets, distribution=distribution, backend="cpp")
    if kind == "perturb":
        fastzo.perturb_(expected, seed, -2 * EPS, **common)
        emulated_cuda_kernel(mixed, keys, offsets, seed, distribution, a=-2 * EPS)
    elif kind == "fused":
        fastzo.restore_update_and_perturb_(expected, seed, EPS, lr, g, wd, next_seed, EPS,
                                           stochastic_rounding=True, **common)
        emulated_cuda_kernel(mixed, keys, offsets, seed, distribution, update=True, a=EPS,
                             decay=decay, b=step, stochastic=True, next_seed=next_seed, a_next=EPS)
    else:
        stochastic = kind == "stochastic"
        fastzo.restore_and_update_(expected, seed, EPS, lr, g, wd, stochastic_rounding=stochastic,
                                   **common)
        emulated_cuda_kernel(mixed, keys, offsets, seed, distribution, update=True, a=EPS,
                             decay=decay, b=step, stochastic=stochastic)
    for got, want in zip(mixed, expected):
        assert torch.equal(got, want)


@needs_cpp
@pytest.mark.parametrize("blocks,threads", [(1, 1), (2, 3), (7, 64)])
def test_emulated_cuda_kernel_does_not_depend_on_the_grid(emulated_cuda_kernel, blocks, threads,
                                                          gen):
    skip_gaussian_on_the_scalar_variant("gaussian")
    views, keys, offsets = _awkward_views(gen, torch.bfloat16)
    expected = [v.clone() for v in views]
    fastzo.perturb_(expected, 99, EPS, keys=keys, offsets=offsets, backend="cpp")
    emulated_cuda_kernel(views, keys, offsets, 99, "gaussian", a=EPS, blocks=blocks,
                         threads=threads)
    for got, want in zip(views, expected):
        assert torch.equal(got, want)


EDGES = {  # extreme values per 16-bit dtype: largest finite (the next value away is inf), inf,
    # NaN, subnormals (of float32 and of the dtype), zeros
    torch.bfloat16: [3.3895e38, -3.3895e38, 3.38e38, float("inf"), float("-inf"), float("nan"),
                     1e-39, -1e-39, 9.2e-41, 0.0, -0.0, 1.0, -1.0],
    torch.float16: [65504.0, -65504.0, 65472.0, float("inf"), float("-inf"), float("nan"),
                    6.1e-5, -6.1e-5, 3e-5, 6e-8, -1.2e-7, 1e-39, 0.0, -0.0, 1.0, -1.0],
}


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lr", [1e-3, 30.0])  # small steps, and steps across the overflow edge
def test_emulated_cuda_kernel_stochastic_edges_equal_cpp(emulated_cuda_kernel, dtype, lr, gen):
    """The CUDA kernel's stochastic rounding without the division (bfloat16 in integers, float16
    from its value toward zero) against cpp's float rule on extreme values."""
    edges = torch.tensor(EDGES[dtype], dtype=torch.float32)
    w = torch.cat([edges.repeat(64), random_weights(3000, torch.float32, gen)]).to(dtype)
    expected = w.clone()
    seed, g, wd = 99, 0.6, 0.0
    step = fastzo.ops.as_float32(lr * g, "step")
    fastzo.restore_and_update_([expected], seed, EPS, lr, g, wd, keys=[4], stochastic_rounding=True,
                               distribution="rademacher", backend="cpp")
    emulated_cuda_kernel([w], [4], [0], seed, "rademacher", update=True, a=EPS, decay=1.0,
                         b=step, stochastic=True)
    bits = lambda t: t.view(torch.int16)  # noqa: E731  (NaN compares by bits)
    assert torch.equal(bits(w), bits(expected))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_fast_math_stays_within_its_bound(emulated_cuda_kernel, dtype, gen):
    """Fast math's reduction of the angle and its exact use of sine and cosine, on the host (the
    accurate sinf/cosf/sqrtf where the GPU has sin.approx/cos.approx/sqrt.approx, whose documented
    errors add at most 4.1e-6): z against the oracle, and the passes against cpp within that."""
    n, offset = 40000, 2**35 + 3
    fast, polynomial = torch.zeros(n), torch.zeros(n)
    emulated_cuda_kernel([fast], [8], [offset], 2**64 - 9, "gaussian", a=1.0, fast_math=True)
    emulated_cuda_kernel([polynomial], [8], [offset], 2**64 - 9, "gaussian", a=1.0)
    z = oracle_noise(n, 2**64 - 9, 8, offset, "gaussian")
    assert (fast - z).abs().max().item() <= 1e-6
    assert (fast != polynomial).any()  # the fast-math kernel ran
    views, keys, offsets = _awkward_views(gen, dtype)
    expected = [v.clone() for v in views]
    fastzo.perturb_(expected, 99, EPS, keys=keys, offsets=offsets, backend="cpp")
    emulated_cuda_kernel(views, keys, offsets, 99, "gaussian", a=EPS, fast_math=True)
    for got, want in zip(views, expected):
        assert_stored_like_oracle(got, want.float(), "gaussian", EPS)


# --- CUDA ------------------------------------------------------------------------------------

def _cuda_available():
    return torch.cuda.is_available() and "cuda" in fastzo.available_backends()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU and fastzo._C built with CUDA")
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_cuda_perturb_matches_the_oracle(distribution, dtype, n, gen):
    w = random_weights(n, dtype, gen).cuda()
    z = fastzo.zo_noise(n, 77, 6, offset=3, distribution=distribution).cuda()
    want = w.float() + torch.tensor(EPS, dtype=torch.float32) * z
    fastzo.perturb_([w], 77, EPS, keys=[6], offsets=[3], distribution=distribution, backend="cuda")
    assert_stored_like_oracle(w, want, distribution, EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU and fastzo._C built with CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpp(dtype, gen):
    """Rademacher passes are bit-identical across devices; several tensors, odd offsets and
    misaligned views exercise the scalar edges of the vectorised kernel."""
    base = random_weights(300011, dtype, gen)
    base_gpu = base.cuda()
    cuts = [slice(1, 1001), slice(2000, 2001), slice(4096, 200000), slice(200003, None)]
    keys, offsets = [1, 2, 3, 4], [0, 13, 2**33 + 8, 5]
    args = dict(seed=2**64 - 1, eps=EPS, lr=1e-3, projected_grad=0.7, weight_decay=0.01,
                keys=keys, offsets=offsets, distribution="rademacher", stochastic_rounding=True)
    cpu = [base[c] for c in cuts]
    gpu = [base_gpu[c] for c in cuts]  # views: misaligned starts on the device too
    fastzo.restore_and_update_(cpu, backend="cpp" if HAS_CPP else "torch", **args)
    fastzo.restore_and_update_(gpu, backend="cuda", **args)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    fused = dict(args, next_seed=5, next_scale=-EPS)
    fastzo.restore_update_and_perturb_(cpu, backend="cpp" if HAS_CPP else "torch", **fused)
    fastzo.restore_update_and_perturb_(gpu, backend="cuda", **fused)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    fastzo.perturb_(cpu, 3, EPS, keys=keys, offsets=offsets, backend="cpp" if HAS_CPP else "torch")
    fastzo.perturb_(gpu, 3, EPS, keys=keys, offsets=offsets, backend="cuda")
    for a, b in zip(cpu, gpu):
        assert_stored_like_oracle(b.cpu(), a.float(), "gaussian", 2 * EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU and fastzo._C built with CUDA")
def test_cuda_gaussian_noise_is_within_the_contract_tolerance():
    n, offset = 278011, 2**35 + 3
    w = torch.zeros(n, device="cuda")
    fastzo.perturb_([w], 2**64 - 9, 1.0, keys=[8], offsets=[offset], backend="cuda")
    z = oracle_noise(n, 2**64 - 9, 8, offset, "gaussian")
    assert (w.cpu() - z).abs().max().item() <= Z_TOL
