#!/usr/bin/env bash
# One prepared GPU run: kernel tests on the GPU, then the benchmarks; results under $OUT.
# Installs nothing from the network: uses the machine's torch, triton, transformers, nvcc.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 FASTZO_TEST_GPU=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt" 2>&1
# Build the extension in place (CUDA part included when nvcc and a CUDA torch are present).
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || echo "extension build failed" >> "$OUT/build.log"
python -c "import fastzo; print(fastzo.available_backends())" >> "$OUT/gpu.txt" 2>&1
timeout 240 python -m pytest -q -x tests/test_ops.py tests/test_noise.py tests/test_optim.py \
    tests/test_cpp_backend.py -m "not slow" > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.txt"
timeout 150 python -m fastzo bench --device cuda --sizes 1e6,1e7,1e8 --dtypes float32,bfloat16 \
    --repeats 10 --model 1024x8,2048x16 --model-dtypes bfloat16 --out "$OUT" > "$OUT/bench.txt" 2>&1
timeout 120 python benchmarks/bench_optimizer.py --device cuda --hidden 2048 --layers 16 \
    --dtypes bfloat16 --batch 4 --seq 128 --out "$OUT/optimizer_overhead.csv" > "$OUT/optimizer.txt" 2>&1
tail -n 5 "$OUT"/*.txt
