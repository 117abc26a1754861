#!/usr/bin/env bash
# The prepared GPU run: strict build, every test file with a GPU case, every benchmark with a
# --device cuda path, and measured GB/s of every pass against the static model's prediction.
# Results under $OUT. Installs nothing from the network: uses the machine's torch, triton,
# transformers and nvcc.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# It cannot pass hollow: it exits non-zero when there is no GPU, when the CUDA part of the
# extension does not build or does not load, when any test fails or is skipped (on a GPU
# machine every GPU case must run), and when any benchmark fails. Every step runs even after an
# earlier one failed, so one run gives every result; $OUT/status.txt lists each step's outcome.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
# FASTZO_STRICT_BUILD for the build and for the tests (the strict-build test runs, not skips)
export HF_HUB_OFFLINE=1 FASTZO_TEST_GPU=1 FASTZO_STRICT_BUILD=1
: > "$OUT/status.txt"
failed=0
step() {  # step NAME COMMAND...: run, record the exit status, keep going
  local name=$1
  shift
  "$@"
  local rc=$?
  echo "$name: exit $rc" >> "$OUT/status.txt"
  [ "$rc" -eq 0 ] || failed=1
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt" 2>&1
step "gpu present" $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"

# Strict build: a failed CUDA build is an error here, not a warning that leaves the CUDA tests
# skipped.
step "strict build" bash -c "FASTZO_STRICT_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . > '$OUT/build.log' 2>&1"
step "cuda extension loads" $PY -c "
import sys, fastzo
from fastzo import _C
print(fastzo.available_backends(), 'HAS_CUDA', _C.HAS_CUDA)
sys.exit(0 if _C.HAS_CUDA and {'cuda', 'triton'} <= set(fastzo.available_backends()) else 1)" >> "$OUT/gpu.txt" 2>&1

# Every test file that has a GPU case (FASTZO_TEST_GPU=1 puts the tensors on the GPU), the
# distributed tests' GPU case, and the ahead-of-time compile checks (sm_90 subset). The strict
# build test runs too. -rs lists skips; the junit file is checked for them below.
step "pytest" timeout 900 $PY -m pytest -q -rs --junitxml="$OUT/pytest.xml" \
    tests/test_ops.py tests/test_noise.py tests/test_optim.py tests/test_cpp_backend.py \
    tests/test_lowprec.py tests/test_triton_kernel.py \
    "tests/test_distributed.py::test_nccl_data_parallel_on_gpus" \
    tests/test_gpu_compile.py -m "not slow or gpu" > "$OUT/pytest.txt" 2>&1
step "no skipped test" $PY - "$OUT/pytest.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
skipped = [(case.get("classname"), case.get("name"), s.get("message"))
           for case in ET.parse(sys.argv[1]).iter("testcase") for s in case.findall("skipped")]
for c, n, m in skipped:
    print(f"SKIPPED on a GPU machine: {c}::{n}: {m}")
sys.exit(1 if skipped else 0)
EOF

# Measured against predicted: every pass, both backends, with and without fast math.
step "predicted table" $PY benchmarks/predict_passes.py --out "$OUT/passes_predicted.csv" \
    --polynomial > "$OUT/passes_predicted.md" 2> "$OUT/passes_predicted.log"
step "measured passes" timeout 600 $PY benchmarks/gpu_passes.py --device cuda \
    --predicted "$OUT/passes_predicted.csv" --out "$OUT/passes_measured.csv" > "$OUT/passes_measured.txt" 2>&1

# Every benchmark with a --device cuda path.
step "fastzo bench" timeout 300 $PY -m fastzo bench --device cuda --sizes 1e6,1e7,1e8 \
    --dtypes float32,bfloat16 --repeats 10 --model 1024x8,2048x16 --model-dtypes bfloat16 \
    --out "$OUT" > "$OUT/bench.txt" 2>&1
step "bench_optimizer" timeout 300 $PY benchmarks/bench_optimizer.py --device cuda --hidden 2048 \
    --layers 16 --dtypes bfloat16 --batch 4 --seq 128 --out "$OUT/optimizer_overhead.csv" \
    > "$OUT/optimizer.txt" 2>&1
step "memory_validation" timeout 300 $PY benchmarks/memory_validation.py --device cuda \
    --out "$OUT/memory_validation.csv" > "$OUT/memory_validation.txt" 2>&1
for backend in cuda triton; do
  step "lowprec_passes $backend" timeout 300 $PY benchmarks/lowprec_passes.py --backend $backend \
      --out "$OUT/lowprec_passes_$backend.csv" > "$OUT/lowprec_passes_$backend.txt" 2>&1
done

cat "$OUT/status.txt"
tail -n 3 "$OUT"/*.txt
exit $failed
