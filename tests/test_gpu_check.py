"""benchmarks/gpu_check.sh, the prepared GPU run, must not be able to pass hollow.

It cannot run here (no GPU), so these tests read it: a strict build, every test file with a GPU
case, every benchmark with a CUDA path, and a skip check that fails on any skipped test.
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "benchmarks" / "gpu_check.sh").read_text()


def test_builds_strictly_and_requires_the_cuda_extension():
    install = next(line for line in SCRIPT.splitlines() if "pip install" in line)
    assert "FASTZO_STRICT_BUILD=1" in install
    # exported for the tests too, so the strict-build test runs instead of skipping
    assert re.search(r"^export .*\bFASTZO_STRICT_BUILD=1\b", SCRIPT, re.M)
    assert "_C.HAS_CUDA" in SCRIPT and "torch.cuda.is_available()" in SCRIPT
    assert re.search(r"^exit \$failed$", SCRIPT, re.M)  # any failed step fails the run


def _gpu_test_files():
    """Test files with a GPU case: a gpu-marked test or tensors on helpers.DEVICE."""
    out = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        if path.name == "test_gpu_check.py":
            continue
        text = path.read_text()
        if "mark.gpu" in text or re.search(r"from helpers import[^\n]*\bDEVICE\b", text):
            out.add(path.name)
    return out


def test_runs_every_test_file_with_a_gpu_case():
    files = _gpu_test_files()
    assert {"test_ops.py", "test_lowprec.py", "test_cpp_backend.py"} <= files
    for name in files:
        assert f"tests/{name}" in SCRIPT, f"{name} has a GPU case but gpu_check.sh does not run it"


def test_runs_every_benchmark_with_a_cuda_path():
    sources = list((ROOT / "benchmarks").glob("*.py")) + [ROOT / "fastzo" / "benchmark.py"]
    with_device = [p for p in sources if re.search(r"add_argument\(\s*\"--device\"", p.read_text())
                   and p.name != "gpu_passes.py"]
    assert with_device
    for path in with_device:
        name = "-m fastzo bench" if path.name == "benchmark.py" else f"benchmarks/{path.name}"
        assert name in SCRIPT, f"{path.name} has a --device path but gpu_check.sh does not run it"
    for name in ("benchmarks/gpu_passes.py", "benchmarks/predict_passes.py",
                 "benchmarks/lowprec_passes.py"):
        assert name in SCRIPT


def _skip_checker() -> str:
    m = re.search(r'step "no skipped test" \$PY - "\$OUT/pytest.xml" <<\'EOF\'\n(.*?)\nEOF\n', SCRIPT,
                  re.S)
    assert m, "the skip check is missing"
    return m.group(1)


def test_any_skipped_test_fails_the_run(tmp_path):
    code = _skip_checker()
    junit = tmp_path / "pytest.xml"
    ok = ('<testsuites><testsuite name="pytest"><testcase classname="tests.test_ops" '
          'name="test_a"/></testsuite></testsuites>')
    junit.write_text(ok)
    assert subprocess.run([sys.executable, "-c", code, str(junit)]).returncode == 0
    junit.write_text(ok.replace('name="test_a"/>', 'name="test_a"><skipped message="needs a CUDA '
                                'GPU"/></testcase>'))
    run = subprocess.run([sys.executable, "-c", code, str(junit)], capture_output=True, text=True)
    assert run.returncode == 1 and "needs a CUDA GPU" in run.stdout


def test_gpu_pass_benchmark_runs_on_a_cpu(tmp_path):
    """The measured-against-predicted benchmark, on small CPU tensors through backend cpp (or
    the oracle), so it is known to work before the GPU run."""
    import fastzo

    backend = "cpp" if "cpp" in fastzo.available_backends() else "torch"
    out = tmp_path / "measured.csv"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_passes.py"), "--device",
                          "cpu", "--backends", backend, "--n", "4096", "--repeats", "2",
                          "--predicted", str(ROOT / "benchmarks" / "results" / "predicted_passes.csv"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 46 and "measured_pct_of_copy" in rows[0]
