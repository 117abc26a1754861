"""The CPU kernel variants of backend "cpp" (csrc/cpu_simd.h: AVX-512, AVX2, NEON and the scalar
reference): each one, forced in turn, gives the scalar variant's bits on every Rademacher pass;
on Gaussian passes the vector variants (which fuse the Box-Muller polynomial steps) give each
other's bits and the scalar's up to a few float32 ulps of z; the variant report and
FASTZO_CPU_ISA; the native check of the torch-free header (x86 here, aarch64 under qemu); and
the Gaussian's error against Box-Muller in float64."""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastzo
from fastzo import backends, noise
from helpers import DTYPES, SIZES

HAS_CPP = "cpp" in fastzo.available_backends()
pytestmark = pytest.mark.skipif(not HAS_CPP, reason="fastzo._C is not built")
ROOT = Path(__file__).resolve().parents[1]
VECTOR_VARIANTS = ["avx512", "avx2", "neon"]
# Box-Muller of the CPU kernels against float64 Box-Muller on the same words, in float32 ulps of
# the float64 value (docs/native.md): measured at most 3.68 ulp with the vector variants' fused
# polynomial steps, 3.66 with the scalar code's separate multiplies and adds, over 10^8 random
# draws, the radius tails and all 2^24 angles.
MAX_GAUSSIAN_ULP = 4.0
EPS = 1e-3


def _C():
    return backends.get_backend("cpp").load_extension()


@pytest.fixture
def select_variant():
    """Switches the CPU kernel variant for one test and restores the one in use before."""
    before = _C().cpu_kernel_isa()

    def select(name):
        if name not in _C().cpu_kernel_variants():
            pytest.skip(f"this build or CPU has no {name} variant ({_C().cpu_kernel_variants()})")
        _C()._select_cpu_kernel_isa(name)

    yield select
    _C()._select_cpu_kernel_isa(before)


def _run_every_pass(dtype, distribution, seed):
    """Every pass over tensors of awkward sizes and offsets; the tensors after each pass."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(n, generator=gen) * 0.02).to(dtype) for n in SIZES]
    keys = list(range(3, 3 + len(SIZES)))
    offsets = [0, 2**33 + 5, 127, 16381][: len(SIZES)] + [0] * max(0, len(SIZES) - 4)
    common = dict(keys=keys, offsets=offsets, distribution=distribution, backend="cpp")
    states = []
    fastzo.perturb_(tensors, 11, EPS, **common)
    states.append([t.clone() for t in tensors])
    for stochastic in (False, True):
        fastzo.restore_and_update_(tensors, 11, EPS, 1e-2, 3.0, 0.1, stochastic_rounding=stochastic,
                                   **common)
        states.append([t.clone() for t in tensors])
    fastzo.restore_update_and_perturb_(tensors, 12, EPS, 1e-2, -2.0, 0.1, 13, EPS,
                                       stochastic_rounding=True, **common)
    states.append([t.clone() for t in tensors])
    if dtype != torch.float32:
        quanta = [fastzo.exact_quantum(t, EPS) for t in tensors]
        fastzo.snap_to_grid_(tensors, quanta)
        fastzo.exact_perturb_(tensors, 14, EPS, 1, quanta, **common)
        fastzo.restore_and_update_(tensors, 14, EPS, 1e-2, 1.0, exact_quanta=quanta, **common)
        states.append([t.clone() for t in tensors])
    return states


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("variant", VECTOR_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_variant_gives_the_scalar_bits_on_rademacher_passes(variant, dtype, select_variant):
    """Bit for bit on every pass: Philox, the signs, stochastic rounding and the 16-bit stores."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed {seed}")
    select_variant("scalar")
    want = _run_every_pass(dtype, "rademacher", seed)
    select_variant(variant)
    assert _C().cpu_kernel_isa() == variant
    got = _run_every_pass(dtype, "rademacher", seed)
    for stage, (g, w) in enumerate(zip(got, want)):
        for t_got, t_want in zip(g, w):
            assert torch.equal(_bits(t_got), _bits(t_want)), stage
    assert not torch.equal(got[0][-1], got[1][-1])  # the passes did change the weights


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_variants_give_each_other_s_bits_on_gaussian_passes(dtype, select_variant):
    """They evaluate the same fused Box-Muller expressions (as the CUDA kernel does)."""
    present = [v for v in VECTOR_VARIANTS if v in _C().cpu_kernel_variants()]
    if len(present) < 2:
        pytest.skip(f"needs two vector variants, this CPU runs {_C().cpu_kernel_variants()}")
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed {seed}")
    results = []
    for variant in present:
        select_variant(variant)
        results.append(_run_every_pass(dtype, "gaussian", seed))
    for other in results[1:]:
        for stage, (g, w) in enumerate(zip(other, results[0])):
            for t_got, t_want in zip(g, w):
                assert torch.equal(_bits(t_got), _bits(t_want)), stage


@pytest.mark.parametrize("variant", VECTOR_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_gaussian_passes_equal_the_scalar_ones_up_to_rounding(variant, dtype,
                                                                     select_variant):
    """z differs from the scalar variant's by a few float32 ulps, so float32 weights differ by
    about that times the pass's scale, and a 16-bit weight only where that moved a rounding
    decision (a one-step difference, rare)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed {seed}")
    select_variant("scalar")
    want = _run_every_pass(dtype, "gaussian", seed)
    select_variant(variant)
    got = _run_every_pass(dtype, "gaussian", seed)
    differing = total = 0
    for stage, (g, w) in enumerate(zip(got, want)):
        for t_got, t_want in zip(g, w):
            assert torch.equal(t_got.isnan(), t_want.isnan()), stage
            if dtype == torch.float32:
                # the largest scale of a pass here is 0.3 (step), times |dz| <= 1e-6
                torch.testing.assert_close(t_got, t_want, rtol=0, atol=1e-6, equal_nan=True)
            else:
                differing += int((_bits(t_got) != _bits(t_want)).sum())
                total += t_got.numel()
    if dtype != torch.float32:
        print(f"{differing} of {total} 16-bit results differ")
        assert differing <= 1e-3 * total
    assert not torch.equal(got[0][-1], got[1][-1])


def test_the_report_names_the_variant_in_use(select_variant):
    variants = _C().cpu_kernel_variants()
    assert variants[-1] == "scalar" and set(variants) <= {"avx512", "avx2", "neon", "scalar"}
    for name in variants:
        select_variant(name)
        assert _C().cpu_kernel_isa() == name


def test_unknown_or_unrunnable_variant_is_refused(select_variant):
    before = _C().cpu_kernel_isa()
    with pytest.raises(RuntimeError, match="avx9"):
        _C()._select_cpu_kernel_isa("avx9")
    assert _C().cpu_kernel_isa() == before


def _fresh_process(code, isa):
    env = {k: v for k, v in os.environ.items() if k != "FASTZO_CPU_ISA"}
    if isa is not None:
        env["FASTZO_CPU_ISA"] = isa
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_environment_variable_forces_a_variant_at_load():
    code = ("import fastzo; from fastzo.backends import cpp_backend\n"
            "C = cpp_backend.load_extension(); print(C.cpu_kernel_isa(), *C.cpu_kernel_variants())\n")
    default = _fresh_process(code, None)
    assert default.returncode == 0, default.stderr
    chosen, *variants = default.stdout.split()
    assert chosen == variants[0]  # the widest this CPU runs
    for name in variants:
        forced = _fresh_process(code, name)
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.split()[0] == name


def test_invalid_environment_variable_fails_every_pass_before_writing():
    code = ("import torch, fastzo\n"
            "w = torch.ones(10)\n"
            "try:\n"
            "    fastzo.perturb_([w], 1, 1e-3, backend='cpp')\n"
            "except RuntimeError as e:\n"
            "    assert torch.equal(w, torch.ones(10)); print('refused:', e)\n")
    result = _fresh_process(code, "avx9")
    assert result.returncode == 0, result.stderr
    assert "refused" in result.stdout and "FASTZO_CPU_ISA=avx9" in result.stdout


@pytest.mark.parametrize("variant", VECTOR_VARIANTS + ["scalar"])
def test_gaussian_pass_is_within_the_stated_bound(variant, select_variant):
    """z from a real pass (0 + 1 * z) against Box-Muller in float64 on the oracle's Philox words;
    the native check below covers 10^7 draws and the tails."""
    select_variant(variant)
    n, seed, key, offset = 400_000, 2**40 + 3, 6, 2**34
    w = torch.zeros(n)
    fastzo.perturb_([w], seed, 1.0, keys=[key], offsets=[offset], backend="cpp")
    words = noise._philox_words(offset // 4, n // 4, seed, key, noise.STREAM_GAUSSIAN, "cpu")
    u = noise.uniform24(words)
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    angle = (2.0 * math.pi) * u[:, 1::2]
    want = torch.stack((radius[:, 0] * torch.cos(angle[:, 0]), radius[:, 0] * torch.sin(angle[:, 0]),
                        radius[:, 1] * torch.cos(angle[:, 1]), radius[:, 1] * torch.sin(angle[:, 1])),
                       dim=-1).reshape(-1)
    _, exponent = torch.frexp(want)
    ulp = torch.ldexp(torch.ones_like(want), torch.clamp(exponent - 24, min=-149))
    err_ulp = (w.double() - want).abs() / ulp
    assert err_ulp.max() <= MAX_GAUSSIAN_ULP, err_ulp.max()
    assert err_ulp.max() > 0.25  # compared with the unrounded value: some error must show


# --- the torch-free header, compiled on its own ------------------------------------------------

NATIVE = ROOT / "tests" / "native" / "simd_check.cpp"
FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         f"-I{ROOT / 'csrc'}"]


@pytest.fixture(scope="module")
def native_check(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or not NATIVE.exists():
        pytest.skip("needs the sources and a C++ compiler")
    binary = tmp_path_factory.mktemp("native") / "simd_check"
    subprocess.run([compiler, *FLAGS, str(NATIVE), "-o", str(binary)], check=True, timeout=600)
    return binary


def _digests(output):
    return dict(re.findall(r"^(\w+): gaussian digest ([0-9a-f]+)$", output, re.M))


@pytest.mark.slow
def test_native_variants_equal_the_scalar_reference(native_check):
    result = subprocess.run([str(native_check), "300"], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    ran = re.findall(r"^(\w+): agrees with scalar", result.stdout, re.M)
    assert set(ran) == set(_C().cpu_kernel_variants()) - {"scalar"}
    assert len(set(_digests(result.stdout).values())) == 1  # the vector variants: the same z


@pytest.mark.slow
def test_native_gaussian_error_over_ten_million_draws_and_the_tails(native_check):
    result = subprocess.run([str(native_check), "bound", str(MAX_GAUSSIAN_ULP), "10000000"],
                            capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    worst = [float(x) for x in re.findall(r"max ([0-9.]+) ulp", result.stdout)]
    assert len(worst) == 3 * len(_C().cpu_kernel_variants()) and max(worst) <= MAX_GAUSSIAN_ULP


@pytest.mark.slow
def test_neon_variant_under_emulation(tmp_path, native_check):
    """aarch64 build of the header, run under qemu-user: NEON against scalar, the same Gaussian z
    as this machine's vector variants, and its bound."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if compiler is None or qemu is None:
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (apt)")
    binary = tmp_path / "simd_check_aarch64"
    subprocess.run([compiler, *FLAGS, "-static", str(NATIVE), "-o", str(binary)], check=True,
                   timeout=600)
    result = subprocess.run([qemu, str(binary), "100"], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0 and "neon: agrees with scalar" in result.stdout, result.stdout
    here = subprocess.run([str(native_check), "100"], capture_output=True, text=True, timeout=600)
    for digest in _digests(here.stdout).values():  # none where this CPU has no vector variant
        assert _digests(result.stdout)["neon"] == digest
    bound = subprocess.run([qemu, str(binary), "bound", str(MAX_GAUSSIAN_ULP), "1000000"],
                           capture_output=True, text=True, timeout=600)
    print(bound.stdout)
    assert bound.returncode == 0 and "neon random" in bound.stdout, bound.stdout


def test_pass_benchmark_runs_and_reports(tmp_path):
    """benchmarks/bench_cpp.py end to end on tiny sizes, with this build as its own baseline."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_cpp
    finally:
        sys.path.pop(0)
    out, summary = tmp_path / "passes.csv", tmp_path / "passes.md"
    threads = torch.get_num_threads()
    try:
        bench_cpp.main(["--sizes", "5000", "--threads", "1", "--rounds", "2", "--dtypes", "bfloat16",
                        "--baseline", _C().__file__, "--out", str(out), "--summary", str(summary)])
    finally:
        torch.set_num_threads(threads)
    rows = list(__import__("csv").DictReader(open(out)))
    cases = {(r["benchmark"], r["backend"]) for r in rows}
    assert {("add_", "torch"), ("randn", "torch"), ("update_sr_gaussian", "cpp"),
            ("perturb_rademacher", "cpp-before")} <= cases
    assert all(float(r["median"]) > 0 for r in rows)
    text = summary.read_text()
    assert "Ratios" in text and "update_sr / perturb" in text and "load average" in text
