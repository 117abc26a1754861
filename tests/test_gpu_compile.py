"""Ahead-of-time compile checks of the GPU kernels, on machines without a GPU.

Every Triton pass variant is compiled for sm_80 (A100), sm_87 (Jetson Orin) and sm_90
(H100/H200; exact mode for sm_90 only) with `triton_backend.compile_pass`, exactly as a launch
would compile it, and the
machine code is checked for what the static model (benchmarks/sass_model.py) needs: no spills or
local memory, at most 64 registers per thread, 128-bit global accesses and no shared memory or
barriers in the hot loop. The PTX is checked for what the interpreter cannot show: no multiply-add
contraction where the contract needs separate roundings. The CUDA kernels get the same checks
with nvcc where it exists.

The default run compiles a representative subset for sm_90; the full matrix is marked slow.
"""

import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastzo.backends import triton_backend as tb

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import predict_passes  # noqa: E402
import sass_model  # noqa: E402

ARCHS = (80, 87, 90)


def _aot_available() -> str | None:
    try:
        tb.check_aot_available()
    except Exception as exc:  # no triton, or one without its NVIDIA backend
        return f"{type(exc).__name__}: {exc}"
    return None


pytestmark = pytest.mark.skipif(_aot_available() is not None,
                                reason=f"no ahead-of-time Triton compiler: {_aot_available()}")


VARIANTS = tb.pass_variants()


def _name(v) -> str:
    parts = [str(v["dtype"]).removeprefix("torch."), v["distribution"],
             "update" if v["update"] else "perturb"]
    parts += [flag for flag, key in (("sr", "stochastic_rounding"), ("next", "fused_next"),
                                     ("exact", "exact")) if v[key]]
    return "-".join(parts)


# sm_90, one of each kind of arithmetic: plain, stochastic rounding (bf16 and fp16), fused step,
# exact, fp16
DEFAULT = {"float32-gaussian-perturb", "float32-rademacher-update",
           "bfloat16-gaussian-update-sr", "bfloat16-rademacher-update-sr",
           "float16-rademacher-update-sr", "float16-gaussian-perturb",
           "bfloat16-rademacher-update-sr-next", "bfloat16-rademacher-update-exact"}
# Exact mode (no target; its compiles are the slowest) on sm_90 only.
CASES = [pytest.param(cc, v, id=f"sm{cc}-{_name(v)}",
                      marks=() if cc == 90 and _name(v) in DEFAULT else pytest.mark.slow)
         for cc in ARCHS for v in VARIANTS if cc == 90 or not v["exact"]]


@functools.lru_cache(maxsize=None)
def _batch(cc: int, slow: bool):
    """Compile a whole group at once (one subprocess under the interpreter)."""
    group = [v for v in VARIANTS if (cc == 90 and _name(v) in DEFAULT) != slow
             and (cc == 90 or not v["exact"])]
    return dict(zip((_name(v) for v in group), tb.compile_passes(cc, group)))


def _compiled(cc, v):
    slow = not (cc == 90 and _name(v) in DEFAULT)
    return _batch(cc, slow)[_name(v)]


@functools.lru_cache(maxsize=None)
def _hot_loop(cc, name):
    """The static model's view of the kernel's hot loop (the aligned, unmasked path)."""
    v = next(x for x in VARIANTS if _name(x) == name)
    compiled = _compiled(cc, v)
    path = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"fastzo-{os.getpid()}-{cc}-{name}.cubin"
    path.write_bytes(compiled.cubin)
    try:
        elem_bytes = 4 if v["dtype"] == torch.float32 else 2
        per_thread = compiled.block // (32 * compiled.num_warps)
        (result,) = sass_model.analyse(str(path), None, elem_bytes, per_thread).values()
    finally:
        path.unlink()
    return result


# Explicit tl.fma in Box–Muller, per Philox call: two logarithms of 12 (8 polynomial steps, the
# reduction, 3 final steps) and two angles of 1 + 3 + 4 (the reduced angle, sine, cosine; the
# angle alone with hardware sin/cos). float16 stochastic rounding: one per element, u·gap (exact:
# gap is a power of two).
def _expected_fma(v, compiled) -> int:
    # the kernel holds the arithmetic twice: aligned and masked path
    per_lane = compiled.block // (32 * compiled.num_warps)
    rounding = per_lane if v["dtype"] == torch.float16 and v["stochastic_rounding"] else 0
    if v["distribution"] != "gaussian":
        return rounding * 2
    per_call = 24 + (2 if compiled.fast_math else 16)
    noise_blocks = 2 if v["fused_next"] else 1
    # two Philox calls per lane
    return (per_call * 2 * noise_blocks + rounding) * 2


@pytest.mark.parametrize("cc, v", CASES)
def test_triton_pass_compiles_to_what_the_model_needs(cc, v):
    compiled = _compiled(cc, v)
    assert compiled.block == tb.GPU_BLOCK and compiled.num_warps == tb.NUM_WARPS
    assert compiled.cubin[:4] == b"\x7fELF" and ".entry _zo_pass_kernel" in compiled.ptx
    usage = compiled.resource_usage()
    hot = _hot_loop(cc, _name(v))
    # 128-bit global accesses in the hot loop: one load and one store per 16 bytes of weights
    assert set(hot["mem"]) == {"LD.128", "ST.128"}, hot["mem"]
    assert hot["ld_bytes"] == hot["st_bytes"] == 16 * max(1, hot["elems"] * (
        4 if v["dtype"] == torch.float32 else 2) // 16)
    if v["exact"]:
        return  # exact mode: reported by benchmarks/predict_passes.py, no target
    assert usage["local"] == 0 and usage["stack"] == 0, usage  # no spills
    # 64, except the fused step, which spills at 64 (two seeds' noise: 128)
    cap = tb.register_cap(v["fused_next"], False)
    assert usage["registers"] <= cap, usage
    if not v["fused_next"]:
        assert cap == tb.MAX_REGISTERS == 64
    assert "STL" not in compiled.sass and "LDL" not in compiled.sass
    counts = hot["counts"]
    assert counts.get("smem", 0) == 0 and counts.get("barrier", 0) == 0, dict(counts)


@pytest.mark.parametrize("cc, v", CASES)
def test_triton_pass_does_not_contract_the_update(cc, v):
    """On a GPU, a plain mul.f32 followed by add.f32 may be fused by ptxas into one FMA, which
    rounds once and would break the Rademacher bit-match with the oracle whenever weight decay is
    non-zero. Every float32 multiply, add and subtract must carry an explicit rounding mode (ptxas
    never fuses those), and the only FMAs are the noise polynomials' explicit ones."""
    compiled = _compiled(cc, v)
    ptx = compiled.ptx
    assert not re.search(r"\b(mul|add|sub)\.f32\b", ptx), "contractible float32 arithmetic"
    assert re.search(r"\b(mul|add)\.rn\.f32\b", ptx)  # (a Rademacher z multiplies by its sign)
    assert len(re.findall(r"\bfma\.rn\.f32\b", ptx)) == _expected_fma(v, compiled)
    assert not re.search(r"\bfma\.(?!rn\.f32)", ptx)


def test_compile_pass_is_cached_and_rejects_bad_input():
    v = next(x for x in VARIANTS if _name(x) == "float32-gaussian-perturb")
    assert tb.compile_pass(90, **v) is _compiled(90, v)
    assert tb.compile_pass((9, 0), **v) is _compiled(90, v)
    with pytest.raises(ValueError, match="cc must be"):
        tb.compile_pass("sm_90", **v)
    with pytest.raises(ValueError, match="distribution"):
        tb.compile_pass(90, dtype=torch.float32, distribution="uniform", update=False)
    with pytest.raises(ValueError, match="dtype"):
        tb.compile_pass(90, dtype=torch.float64, distribution="gaussian", update=False)
    with pytest.raises(ValueError, match="update pass only"):
        tb.compile_pass(90, dtype=torch.bfloat16, distribution="gaussian", update=False,
                        stochastic_rounding=True)
    with pytest.raises(ValueError, match="16-bit"):
        tb.compile_pass(90, dtype=torch.float32, distribution="gaussian", update=True,
                        stochastic_rounding=True)
    with pytest.raises(ValueError, match="16-bit"):
        tb.compile_pass(90, dtype=torch.float32, distribution="gaussian", update=True, exact=True)


def test_fast_math_compiles_to_hardware_sine_and_cosine():
    v = next(x for x in VARIANTS if _name(x) == "bfloat16-gaussian-perturb")
    compiled, plain = tb.compile_passes(90, [dict(v, fast_math=True), dict(v, fast_math=False)])
    assert compiled.fast_math and not plain.fast_math
    assert "sin.approx.f32" in compiled.ptx and "cos.approx.f32" in compiled.ptx
    sass = compiled.sass
    assert "MUFU.SIN" in sass and "MUFU.COS" in sass
    assert len(re.findall(r"\bfma\.rn\.f32\b", compiled.ptx)) == _expected_fma(v, compiled)
    assert "sin.approx" not in plain.ptx and "MUFU.SIN" not in plain.sass
    assert len(re.findall(r"\bfma\.rn\.f32\b", plain.ptx)) == _expected_fma(v, plain)


# ---- CUDA kernels with nvcc ---------------------------------------------------------------------

NVCC = shutil.which("nvcc") or next(
    (str(p) for p in sorted(pathlib.Path("/usr/local").glob("cuda*/bin/nvcc"))), None)
# The device flags setup.py builds fastzo._C with (checked against setup.py below), the source
# that takes the address of every kernel a launch can pick, and the kernels' names.
NVCC_FLAGS, INSTANTIATE, CUDA_KERNEL = (predict_passes.NVCC_FLAGS, predict_passes.INSTANTIATE,
                                        predict_passes.CUDA_KERNEL)
# 26 plain passes, 13 of them Gaussian with a fast-math twin, 20 exact ones
N_CUDA_KERNELS = 59


def test_setup_builds_the_cuda_kernels_with_the_checked_flags():
    text = (ROOT / "setup.py").read_text()
    assert '"nvcc": ' + repr(NVCC_FLAGS).replace("'", '"') in text


@functools.lru_cache(maxsize=None)
def _nvcc(cc: int, tmp_root: str):
    folder = pathlib.Path(tmp_root) / f"sm{cc}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "passes.cu"
    source.write_text(INSTANTIATE)
    # one compilation; -keep leaves the PTX it went through beside the cubin
    subprocess.run([NVCC, "-cubin", f"-arch=sm_{cc}", *NVCC_FLAGS, "-I", str(ROOT / "csrc"),
                    "-keep", "-keep-dir", str(folder), str(source), "-o", str(folder / "passes.cubin")],
                   check=True, capture_output=True)
    (ptx,) = folder.glob("*.ptx")
    return {"cubin": folder / "passes.cubin", "ptx": ptx}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (on PATH or under /usr/local/cuda*)")
@pytest.mark.parametrize("cc", [pytest.param(cc, marks=() if cc == 90 else pytest.mark.slow)
                                for cc in ARCHS])
def test_cuda_kernels_compile_to_what_the_model_needs(cc, tmp_path_factory):
    files = _nvcc(cc, str(tmp_path_factory.getbasetemp()))
    cubin, ptx = str(files["cubin"]), files["ptx"].read_text()
    usage = tb._nvidia_tool("cuobjdump", "--dump-resource-usage", files["cubin"].read_bytes())
    rows = re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert len(rows) == N_CUDA_KERNELS  # every instantiation a launch can pick
    for name, reg, stack, shared, local in rows:
        assert (int(stack), int(shared), int(local)) == (0, 0, 0), name  # no spills, no smem
        # the launch bounds: 64 registers, the fused step 80, exact mode 128
        m = CUDA_KERNEL.search(name)
        fused, exact = m.group(5) == "1", m.group(6) == "1"
        assert int(reg) <= (128 if exact else 80 if fused else 64), (name, reg)
    results = sass_model.analyse(cubin, None, 4)
    assert len(results) == N_CUDA_KERNELS
    for name, res in results.items():
        assert "ST.128" in res["mem"] and "LD.128" in res["mem"], (name, res["mem"])
        assert res["counts"].get("barrier", 0) == 0 and res["counts"].get("smem", 0) == 0
    # PTX: --fmad=false leaves only the explicit fmaf of the noise polynomials and of float16
    # stochastic rounding (u·gap, exact), so the other Rademacher kernels have none and every
    # plain float32 operation rounds on its own
    entries = re.split(r"\.entry\s+", ptx)[1:]
    assert len(entries) == N_CUDA_KERNELS
    for entry in entries:
        m = CUDA_KERNEL.search(entry.split("(", 1)[0])
        assert m, entry[:200]
        gaussian, stochastic, exact = m.group(2) == "1", m.group(4) == "1", m.group(6) == "1"
        rounding_fma = m.group(1) == "Float16Format" and stochastic and not exact
        has_fma = re.search(r"\bfma\.rn\.f32\b", entry) is not None
        assert has_fma == (gaussian or rounding_fma), m.group(0)
