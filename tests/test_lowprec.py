"""Exact perturbation and unbiased updates for 16-bit weights (docs/lowprec.md)."""

import math

import pytest
import torch

import fastzo
from fastzo import noise
from fastzo.backends import get_backend
from helpers import DEVICE, fast_backends

EPS = 1e-3
HALF = [torch.bfloat16, torch.float16]
EXACT_BACKENDS = [b for b in fast_backends() if hasattr(get_backend(b), "exact_perturb_")] + ["torch"]
FAST_EXACT = [b for b in EXACT_BACKENDS if b != "torch"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def on_grid(t: torch.Tensor, q: float) -> torch.Tensor:
    """Elements that lie on the grid S_q (inf/NaN count as on it: they are never moved)."""
    fmt = noise.FORMATS16[t.dtype]
    e = math.frexp(q)[1] - 1
    b = bits(t.cpu())
    back = noise.grid_bits(noise.grid_index(b, e, fmt), e, fmt)
    return (back == b) | ((b & 0x7FFF) >= fmt.inf_bits)


def weights(n, dtype, gen, std=0.02, extremes=True):
    """N(0, std) weights on their grid, with special values in front; returns (w, q)."""
    w = torch.randn(n, generator=gen) * std
    q = fastzo.exact_quantum(w.to(dtype), EPS)
    if extremes:
        big = torch.finfo(dtype).max
        w[:8] = torch.tensor([0.0, -0.0, big, -big, math.inf, -math.inf, math.nan, 3.0 * std])
    w = w.to(dtype).to(DEVICE)
    fastzo.snap_to_grid_([w], [q])
    return w, q


# ------------------------------------------------------------------------- the grid itself
@pytest.mark.parametrize("dtype", HALF)
def test_grid_index_is_a_bijection_with_uniform_spacing_below_t(dtype):
    fmt = noise.FORMATS16[dtype]
    for e in (fmt.min_exponent, -16, -13, 0, fmt.max_exponent):
        n_max = fmt.max_index(e)
        index = torch.arange(-n_max, n_max + 1)
        b = noise.grid_bits(index, e, fmt)
        assert torch.equal(noise.grid_index(b, e, fmt), index)
        assert b.unique().numel() == index.numel()
        values = torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype).double()
        assert torch.isfinite(values).all() and (values[1:] > values[:-1]).all()
        small = index.abs() <= 2**fmt.mbits
        assert torch.equal(values[small], index[small].double() * 2.0**e)
        assert values[-1] == torch.finfo(dtype).max  # Nmax is the largest finite value


@pytest.mark.parametrize("dtype", HALF)
def test_quantum_follows_rms_and_eps(dtype):
    mbits = noise.FORMATS16[dtype].mbits
    w = torch.full((100,), 0.02, dtype=dtype)
    assert fastzo.exact_quantum(w, 1e-3) == 2.0 ** (-6 - mbits)  # ulp(0.02), 0.02 > 16 eps
    assert fastzo.exact_quantum(torch.zeros(10, dtype=dtype), 1e-3) == 2.0 ** (-6 - mbits)  # ulp(0.016)
    assert fastzo.exact_quantum(torch.zeros(10, dtype=dtype), 1e-2) == 2.0 ** (-3 - mbits)
    assert fastzo.exact_quantum(torch.ones(3), 1e-3) is None  # float32: plain perturbation


def test_snap_rounds_below_t_only_and_clears_negative_zero():
    q = 2.0**-13
    x = torch.tensor([-0.0, 0.3 * q, 0.5 * q, 1.5 * q, 2.5 * q, -2.6 * q, 0.0159, 0.5, math.inf, math.nan])
    w = x.to(torch.bfloat16)
    before = w.clone()
    fastzo.snap_to_grid_([w], [q])
    expected = torch.tensor([0.0, 0.0, 0.0, 2 * q, 2 * q, -3 * q])
    assert same_bits(w[:6], expected.to(torch.bfloat16))
    assert same_bits(w[6:], before[6:])  # |x| >= T = 2**-6: already on the grid
    assert on_grid(w, q).all()


# ----------------------------------------------------------------- reversibility, agreement
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", HALF)
def test_perturbation_cycles_are_bit_exact(backend, distribution, dtype, gen):
    cycles = {"torch": 10, "triton": 4}.get(backend, 200)
    w, q = weights(5000, dtype, gen)
    start = w.clone()
    for cycle in range(cycles):
        for multiple in (1, -2, 1):
            fastzo.exact_perturb_([w], 1000 + cycle, EPS, multiple, [q], keys=[3],
                                  distribution=distribution, backend=backend)
        if cycle == 0:  # the middle of a cycle really moved the weights
            probe = w.clone()
            fastzo.exact_perturb_([probe], 7, EPS, 1, [q], keys=[3], distribution=distribution,
                                  backend=backend)
            assert (bits(probe) != bits(w)).double().mean() > 0.5
    assert same_bits(w, start)


@pytest.mark.parametrize("backend", FAST_EXACT)
@pytest.mark.parametrize("dtype", HALF)
def test_backends_store_identical_bits_for_rademacher(backend, dtype, gen):
    w, q = weights(65000, dtype, gen)
    common = dict(keys=[5], distribution="rademacher", exact_quanta=[q])
    got, want = w.clone(), w.clone()
    for t, b in ((got, backend), (want, "torch")):
        fastzo.exact_perturb_([t], 31, EPS, -2, [q], keys=[5], distribution="rademacher", backend=b)
    assert same_bits(got, want)
    for sr, nxt in ((True, None), (False, None), (True, 77)):
        g2, w2 = got.clone(), want.clone()
        for t, b in ((g2, backend), (w2, "torch")):
            if nxt is None:
                fastzo.restore_and_update_([t], 31, EPS, 1e-2, 0.3, 0.1, stochastic_rounding=sr,
                                           backend=b, **common)
            else:
                fastzo.restore_update_and_perturb_([t], 31, EPS, 1e-2, 0.3, 0.1, nxt, EPS,
                                                   stochastic_rounding=sr, backend=b, **common)
        assert same_bits(g2, w2), (sr, nxt)


@pytest.mark.parametrize("backend", FAST_EXACT)
@pytest.mark.parametrize("dtype", HALF)
def test_gaussian_differences_are_rare_single_grid_steps(backend, dtype, gen):
    """Fast backends' z differ from the oracle's by a few float32 ulp; that can move
    k = rne(eps z / q) across a rounding boundary (or an update across a rounding boundary)."""
    w, q = weights(130000, dtype, gen)
    e, fmt = math.frexp(q)[1] - 1, noise.FORMATS16[dtype]
    results = []
    for b in (backend, "torch"):
        t = w.clone()
        fastzo.exact_perturb_([t], 99, EPS, -2, [q], backend=b)
        fastzo.restore_and_update_([t], 99, EPS, 1e-2, 0.3, backend=b, exact_quanta=[q])
        results.append(noise.grid_index(bits(t.cpu()), e, fmt))
    finite = torch.isfinite(w.cpu().float())
    diff = (results[0] - results[1])[finite].abs()
    assert diff.max() <= 1 and diff.double().mean() < 1e-3


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_float32_tensors_in_an_exact_call_get_the_plain_perturbation(backend, gen):
    a = torch.randn(3000, generator=gen).to(DEVICE)
    h, q = weights(3000, torch.bfloat16, gen)
    plain = a.clone()
    fastzo.exact_perturb_([a, h], 5, EPS, -2, [None, q], backend=backend)
    fastzo.perturb_([plain], 5, -2 * EPS, keys=[0], backend=backend)
    assert torch.equal(a, plain)


# ------------------------------------------------------------------ what the steps mean
@pytest.mark.parametrize("dtype", HALF)
def test_below_t_the_perturbation_is_eps_z_rounded_to_the_grid(dtype, gen):
    w, q = weights(20000, dtype, gen, extremes=False)
    t_value = q * 2 ** noise.FORMATS16[dtype].mbits
    moved = w.clone()
    fastzo.exact_perturb_([moved], 3, EPS, 1, [q], backend="torch")
    z = fastzo.zo_noise(w.numel(), 3, 0)
    k = torch.round(torch.tensor(EPS / q, dtype=torch.float32) * z).double()
    inside = (w.double().abs() + k.abs() * q) < t_value
    assert inside.double().mean() > 0.3
    assert torch.equal((moved.double() - w.double())[inside], (k * q)[inside])


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_zero_tensor_like_lora_b_is_perturbed_updated_and_restored(backend):
    b = torch.zeros(4096, dtype=torch.bfloat16, device=DEVICE)
    q = fastzo.exact_quantum(b, EPS)
    assert q == 2.0**-13
    fastzo.exact_perturb_([b], 8, EPS, 1, [q], backend=backend)
    assert (b != 0).double().mean() > 0.9
    fastzo.exact_perturb_([b], 8, EPS, -2, [q], backend=backend)
    fastzo.exact_perturb_([b], 8, EPS, 1, [q], backend=backend)
    assert torch.equal(bits(b), torch.zeros_like(bits(b)))  # +0 exactly, no -0
    fastzo.exact_perturb_([b], 8, EPS, -1, [q], backend=backend)
    fastzo.restore_and_update_([b], 8, EPS, 1e-2, 1.0, backend=backend, exact_quanta=[q])
    assert (b != 0).double().mean() > 0.3 and on_grid(b, q).all()


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_extreme_values(backend, dtype):
    """Near the largest finite value a step wraps to the other end of the index range and
    back; inf and NaN are never changed; -0 does not survive the snap."""
    big = torch.finfo(dtype).max
    q = 2.0**-13
    x = torch.tensor([big, -big, math.inf, -math.inf, math.nan, -0.0, 0.0] * 128).to(dtype).to(DEVICE)
    fastzo.snap_to_grid_([x], [q])
    start = x.clone()
    assert not (bits(x) == 0x8000).any()
    fastzo.exact_perturb_([x], 2, 0.01, 1, [q], backend=backend, distribution="rademacher")
    finite = torch.isfinite(start.float())
    assert same_bits(x[~finite], start[~finite])
    assert torch.isfinite(x[finite].float()).all()  # wrapped, never inf
    top = finite & (start.float() == big)
    assert (x[top].float() < 0).any() and (x[top].float() > 0).any()  # some wrapped round
    fastzo.exact_perturb_([x], 2, 0.01, -1, [q], backend=backend, distribution="rademacher")
    assert same_bits(x, start)
    fastzo.restore_and_update_([x], 2, 0.0, 1e-3, 1.0, backend=backend, exact_quanta=[q])
    assert same_bits(x[~finite], start[~finite])


# --------------------------------------------------------------------- unbiased updates
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("where", ["below_t", "above_t"])
def test_stochastic_rounding_keeps_tiny_updates_on_average(backend, dtype, where):
    n = 100000
    q = 2.0**-13
    t_value = q * 2 ** noise.FORMATS16[dtype].mbits
    value = 0.37 * t_value if where == "below_t" else 1.37 * t_value
    w = torch.full((n,), value, dtype=dtype, device=DEVICE)
    fastzo.snap_to_grid_([w], [q])
    spacing = q  # below T the grid step; in [T, 2T) the storage ulp is q too
    lr = 0.01 * spacing  # g = -1, Rademacher z: intended change ±1 % of a step
    common = dict(keys=[0], distribution="rademacher", backend=backend, exact_quanta=[q])
    sr, nearest = w.clone(), w.clone()
    fastzo.restore_and_update_([sr], 5, 0.0, lr, -1.0, stochastic_rounding=True, **common)
    fastzo.restore_and_update_([nearest], 5, 0.0, lr, -1.0, stochastic_rounding=False, **common)
    assert same_bits(nearest, w)  # round to nearest drops every update
    z = fastzo.zo_noise(n, 5, 0, distribution="rademacher").double()
    ratio = ((sr.double().cpu() - w.double().cpu()) * z).mean() / lr
    assert abs(ratio.item() - 1) < 0.05
    assert on_grid(sr, q).all()


@pytest.mark.parametrize("dtype", HALF)
def test_grid_invariant_holds_after_many_updates(dtype, gen):
    w, q = weights(20000, dtype, gen)
    for step in range(6):
        fastzo.exact_perturb_([w], step, EPS, 1, [q], backend="torch")
        fastzo.exact_perturb_([w], step, EPS, -2, [q], backend="torch")
        fastzo.restore_and_update_([w], step, EPS, 0.05, 0.7, 0.1, backend="torch", exact_quanta=[q])
        assert on_grid(w, q).all()
    fastzo.restore_update_and_perturb_([w], 9, 0.0, 0.05, 0.3, 0.0, 10, EPS, backend="torch",
                                       exact_quanta=[q])
    assert on_grid(w, q).all()


def test_stochastic_rounding_is_the_default():
    q = 2.0**-13
    w = torch.full((20000,), 0.005, dtype=torch.bfloat16)
    fastzo.snap_to_grid_([w], [q])
    default, explicit = w.clone(), w.clone()
    args = (5, 0.0, 0.01 * q, -1.0)
    fastzo.restore_and_update_([default], *args, exact_quanta=[q], backend="torch")
    fastzo.restore_and_update_([explicit], *args, exact_quanta=[q], stochastic_rounding=True, backend="torch")
    assert same_bits(default, explicit) and not same_bits(default, w)
    opt = fastzo.MeZO([torch.nn.Parameter(w.clone())], lr=1e-3)
    # Exact mode is opt-in (an end-to-end run diverged with it, docs/lowprec.md); SR is default.
    assert opt.exact_perturbation is False and opt.stochastic_rounding in (None, True)


# ---------------------------------------------------------------------------- bad input
BAD = [
    ("not a power of two", dict(quanta=[3e-4]), ValueError),
    ("negative quantum", dict(quanta=[-2.0**-13]), ValueError),
    ("nan quantum", dict(quanta=[math.nan]), ValueError),
    ("quantum below the format's range", dict(quanta=[2.0**-140]), ValueError),
    ("quantum above the format's range", dict(quanta=[2.0**121]), ValueError),
    ("wrong length", dict(quanta=[2.0**-13, 2.0**-13]), ValueError),
    ("quantum for float32", dict(quanta=[2.0**-13], dtype=torch.float32), ValueError),
    ("eps too large for q", dict(quanta=[2.0**-13], eps=100.0), ValueError),
    ("float multiple", dict(multiple=1.0), TypeError),
    ("huge multiple", dict(multiple=1000), ValueError),
    ("string quantum", dict(quanta=["x"]), TypeError),
]


@pytest.mark.parametrize("name,change,error", BAD, ids=[b[0] for b in BAD])
def test_bad_exact_input_raises_before_touching(name, change, error, gen):
    dtype = change.get("dtype", torch.bfloat16)
    w = (torch.randn(1000, generator=gen) * 0.02).to(dtype)
    other = torch.zeros(10, dtype=torch.bfloat16)
    before = w.clone()
    with pytest.raises(error):
        fastzo.exact_perturb_([w], 1, change.get("eps", EPS), change.get("multiple", 1),
                              change.get("quanta", [2.0**-13]))
    if "multiple" not in change:
        with pytest.raises(error):
            fastzo.restore_and_update_([w], 1, change.get("eps", EPS), 1e-3, 1.0,
                                       exact_quanta=change["quanta"])
    assert torch.equal(w, before) and torch.equal(other, torch.zeros_like(other))


# ------------------------------------------------------------------------------ optimizer
def _model(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        model[2].bias.zero_()
    return model.to(DEVICE, dtype)


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g)
    return X.to(DEVICE, dtype), X[:, :1].sin().to(DEVICE, dtype)


def _params_bits(model):
    return [p.detach().clone().view(torch.int16) for p in model.parameters()]


@pytest.mark.parametrize("options", [dict(), dict(estimator="forward"), dict(fused_steps=True),
                                     dict(num_directions=2)],
                         ids=["central", "forward", "fused", "q=2"])
@pytest.mark.parametrize("dtype", HALF)
def test_failed_steps_leave_weights_bit_identical(options, dtype):
    """A step that fails (closure raises, NaN or inf loss) restores the clean weights exactly;
    in fused-steps mode that includes removing the pending +εz it started from."""
    X, y = _data(dtype)

    def three_steps():
        model = _model(dtype)
        opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend="torch", exact_perturbation=True, **options)
        for _ in range(3):
            opt.step(lambda: ((model(X) - y) ** 2).mean())
        return model, opt

    reference, ref_opt = three_steps()
    ref_opt.materialize()
    before = _params_bits(reference)
    model, opt = three_steps()
    loss = lambda: ((model(X) - y) ** 2).mean()  # noqa: E731
    calls = {"n": 0}

    def raises_on_second_call():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("data loader failed")
        return loss()

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(raises_on_second_call)
    with pytest.raises(fastzo.NonFiniteLossError):
        opt.step(lambda: float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.on_nonfinite = "skip"
        opt.step(lambda: math.inf)
    assert opt.weights_are_clean
    after = _params_bits(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt.step_count == 3


def test_optimizer_state_resume_and_replay_are_bit_identical(tmp_path):
    dtype = torch.bfloat16
    X, y = _data(dtype)

    def run(steps, model, opt):
        loss = lambda: ((model(X) - y) ** 2).mean()  # noqa: E731
        for _ in range(steps):
            opt.step(loss)

    start = _model(dtype)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    model = _model(dtype)
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend="torch", exact_perturbation=True, fused_steps=True,
                      trajectory=tmp_path / "run.jsonl")
    run(4, model, opt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    quanta = [opt.state[p]["exact_quantum"] for p in model.parameters()]
    assert all(q is not None and math.frexp(q)[0] == 0.5 for q in quanta)
    assert model[2].bias.abs().max() > 0  # the zero bias got a quantum and was updated
    run(4, model, opt)
    opt.materialize()

    resumed = _model(dtype, seed=5)
    opt2 = fastzo.MeZO(resumed.parameters(), lr=1e-2, backend="torch", exact_perturbation=True, fused_steps=True, seed=9)
    resumed.load_state_dict(weights)
    opt2.load_state_dict(state)
    assert [opt2.state[p]["exact_quantum"] for p in resumed.parameters()] == quanta
    run(4, resumed, opt2)
    opt2.materialize()
    assert all(torch.equal(a, b) for a, b in zip(_params_bits(model), _params_bits(resumed)))

    replayed = _model(dtype, seed=7)
    replayed.load_state_dict(initial)
    fastzo.replay(replayed.parameters(), tmp_path / "run.jsonl", backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(_params_bits(model), _params_bits(replayed)))


def test_fused_steps_equal_separate_steps_bit_for_bit_in_exact_mode():
    dtype = torch.float16
    X, y = _data(dtype)
    results = []
    for fused in (False, True):
        model = _model(dtype)
        opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend="torch", exact_perturbation=True, fused_steps=fused)
        for _ in range(5):
            opt.step(lambda: ((model(X) - y) ** 2).mean())
        opt.materialize()
        results.append(_params_bits(model))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_exact_mode_is_per_dtype_and_can_be_turned_off():
    X, y = _data(torch.float32)
    model = _model(torch.float32)
    model[0].to(torch.bfloat16)
    opt = fastzo.MeZO(model.parameters(), lr=1e-2, backend="torch", exact_perturbation=True)
    opt.step(lambda: ((model[2](model[1](model[0](X.bfloat16()).float())) - y) ** 2).mean())
    assert opt.state[model[0].weight]["exact_quantum"] is not None
    assert "exact_quantum" not in opt.state[model[2].weight]
    off = fastzo.MeZO(_model(torch.bfloat16).parameters(), lr=1e-2, exact_perturbation=False)
    assert off.exact_perturbation is False
    with pytest.raises(TypeError):
        fastzo.MeZO(_model(torch.bfloat16).parameters(), lr=1e-2, exact_perturbation="yes")


# ------------------------------------------------------ the CUDA kernel, emulated on the CPU
@pytest.fixture(scope="module")
def emulated_exact_kernel(tmp_path_factory):
    """csrc/cuda_emulation.cpp built with the host compiler: the CUDA kernel's exact-mode code,
    run thread by thread on the CPU (host math with the device's fused Box-Muller polynomial
    steps, so bit-identical to backend "cpp" in its vector variants)."""
    import ctypes
    import os
    import shutil
    import subprocess
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "csrc" / "cuda_emulation.cpp"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not source.exists() or compiler is None:
        pytest.skip("needs the csrc sources and a C++ compiler")
    library = tmp_path_factory.mktemp("emulation") / "cuda_emulation.so"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off",
                    "-fno-math-errno", "-Wno-unknown-pragmas", str(source), "-o", str(library)],
                   check=True)
    run = ctypes.CDLL(str(library)).fastzo_emulate_exact_pass
    run.restype = ctypes.c_int
    run.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_uint64] * 2 + \
        [ctypes.c_float] * 4 + [ctypes.c_int] * 3
    codes = {torch.bfloat16: 1, torch.float16: 2}

    def launch(tensors, keys, offsets, exponents, seed, distribution, *, update=False, a=0.0,
               decay=1.0, b=0.0, stochastic=False, next_seed=None, a_next=0.0, multiple=1,
               blocks=3, threads=32):
        for dtype, code in codes.items():
            rows = [[t.data_ptr(), t.numel(), k, o, 0, e]
                    for t, k, o, e in zip(tensors, keys, offsets, exponents)
                    if t.dtype == dtype and t.numel()]
            if rows:
                table = torch.tensor(rows, dtype=torch.int64)
                assert run(table.data_ptr(), len(rows), code, distribution == "gaussian", update,
                           stochastic, next_seed is not None, seed, next_seed or 0, a, decay, b,
                           a_next, multiple, blocks, threads) == 0

    return launch


@pytest.mark.skipif("cpp" not in EXACT_BACKENDS, reason="needs backend cpp")
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("kind", ["perturb", "update", "stochastic", "fused"])
def test_emulated_cuda_exact_kernel_equals_cpp(emulated_exact_kernel, kind, distribution, gen):
    from fastzo.backends import cpp_backend

    if distribution == "gaussian" and cpp_backend.load_extension().cpu_kernel_isa() == "scalar":
        pytest.skip("Gaussian z of the scalar CPU variant are not the device's bits")
    base_bf, q_bf = weights(20000, torch.bfloat16, gen)
    base_h, q_h = weights(9000, torch.float16, gen)
    views = [base_bf[0:1], base_bf[1:4], base_bf[5:9000], base_h[3:8000], base_bf[9001:20000]]
    quanta = [q_bf, q_bf, q_bf, q_h, 2 * q_bf]
    exponents = [math.frexp(q)[1] - 1 for q in quanta]
    keys, offsets = [3, 1, 2**32 - 1, 7, 0], [0, 5, 2**33 + 6, 3, 2**62 - 20000]
    got = [v.clone() for v in views]
    want = [v.clone() for v in views]
    seed, next_seed, lr, g, wd = 2**64 - 3, 17, 1e-3, 0.6, 0.05
    decay = fastzo.ops.as_float32(1 - lr * wd, "decay")
    step = fastzo.ops.as_float32(lr * g, "step")
    common = dict(keys=keys, offsets=offsets, distribution=distribution, backend="cpp")
    if kind == "perturb":
        fastzo.exact_perturb_(want, seed, EPS, -2, quanta, **common)
        emulated_exact_kernel(got, keys, offsets, exponents, seed, distribution, a=EPS, multiple=-2)
    elif kind == "fused":
        fastzo.restore_update_and_perturb_(want, seed, EPS, lr, g, wd, next_seed, EPS,
                                           exact_quanta=quanta, **common)
        emulated_exact_kernel(got, keys, offsets, exponents, seed, distribution, update=True, a=EPS,
                              decay=decay, b=step, stochastic=True, next_seed=next_seed, a_next=EPS)
    else:
        sr = kind == "stochastic"
        fastzo.restore_and_update_(want, seed, EPS, lr, g, wd, stochastic_rounding=sr,
                                   exact_quanta=quanta, **common)
        emulated_exact_kernel(got, keys, offsets, exponents, seed, distribution, update=True, a=EPS,
                              decay=decay, b=step, stochastic=sr)
    for a, b in zip(got, want):
        assert same_bits(a, b)


# ---------------------------------------------------------------- sharded 16-bit parameters
def sharded_bf16_worker(rank, world):
    """3 gloo ranks: bf16 DTensor parameters (uneven Shard(0) blocks, one empty, a Replicate())
    in exact mode; returns the full tensors and quanta after 4 steps."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    plain, X, y = _sharded_problem()
    placements = [Shard(0), Shard(0), Replicate(), Shard(0)]
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, [pl])) for t, pl in zip(plain, placements)]
    opt = fastzo.MeZO(params, lr=0.05, eps=1e-3, seed=7, backend="torch", exact_perturbation=True,
                      process_group=dist.group.WORLD)
    for _ in range(4):
        opt.step(lambda: _sharded_loss([p.full_tensor() for p in params], X, y))
    return dict(params=[p.full_tensor() for p in params],
                quanta=[opt.state[p]["exact_quantum"] for p in params])


def _sharded_problem():
    torch.manual_seed(0)
    plain = [torch.randn(5, 6) * 0.3, torch.randn(2) * 0.1, torch.randn(3, 5) * 0.3, torch.randn(3) * 0.1]
    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 6, generator=g)
    return [t.bfloat16() for t in plain], X.bfloat16(), torch.sin(X[:, :3]).bfloat16()


def _sharded_loss(params, X, y):
    w1, b1, w2, b2 = params
    hidden = torch.tanh(X @ w1.T + torch.cat([b1, torch.zeros(3, dtype=b1.dtype)]))
    return ((hidden @ w2.T + b2 - y).float() ** 2).mean()


def test_sharded_bf16_parameters_equal_the_unsharded_run(tmp_path):
    """The quantum of a sharded tensor comes from the rms of the whole tensor (an all-reduce),
    so every shard uses the grid of the unsharded run and the results are bit-identical."""
    import test_distributed

    results = test_distributed.launch(sharded_bf16_worker, 3, out_dir=tmp_path)
    plain, X, y = _sharded_problem()
    params = [torch.nn.Parameter(t) for t in plain]
    opt = fastzo.MeZO(params, lr=0.05, eps=1e-3, seed=7, backend="torch", exact_perturbation=True)
    for _ in range(4):
        opt.step(lambda: _sharded_loss(params, X, y))
    quanta = [opt.state[p]["exact_quantum"] for p in params]
    for r in range(3):
        assert results[r]["quanta"] == quanta
        for got, want in zip(results[r]["params"], params):
            assert same_bits(got, want.detach())


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_update_above_t_is_scaled_by_q_over_the_grid_spacing(backend, dtype):
    """Above T the integer steps enlarge the perturbation by s/q (s the grid spacing), so the
    estimate g is preconditioned by diag(s/q); the exact update divides by the same factor, so
    the expected update of each weight is MeZO's lr·g·z."""
    q = 2.0**-13
    t_value = q * 2 ** noise.FORMATS16[dtype].mbits
    n = 60000
    value = torch.tensor([0.5 * t_value, 1.5 * t_value, 2.5 * t_value, 5.0 * t_value]).repeat_interleave(n // 4)
    w = value.to(dtype).to(DEVICE)
    fastzo.snap_to_grid_([w], [q])
    start = w.clone()
    lr = 3.0 * q  # with g = -1: moves of about 3 grid steps, rounded stochastically
    fastzo.restore_and_update_([w], 11, 0.0, lr, -1.0, distribution="rademacher", backend=backend,
                               exact_quanta=[q])
    z = fastzo.zo_noise(n, 11, 0, distribution="rademacher").double()
    moved = (w.double().cpu() - start.double().cpu()) * z / lr
    for block, factor in enumerate([1, 1, 2, 4]):
        mean = moved[block * n // 4:(block + 1) * n // 4].mean().item()
        assert abs(mean * factor - 1) < 0.05, (block, mean)
    assert on_grid(w, q).all()
