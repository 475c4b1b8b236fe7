#!/usr/bin/env bash
# The GPU checks and benchmarks in one prepared command, for a lent CUDA machine (see docs/benchmarks.md).
#   bash benchmarks/gpu_session.sh eager      # kernel check, model check, inference eager fp16+bf16, training rows
#   bash benchmarks/gpu_session.sh compiled   # inference fp16: the four variants (both libraries eager and compiled)
# Wheels the machine lacks (diffusers) are installed from .whl/ when present. Logs and tables go to $OUT (or out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
phase=${1:-eager}
if [ "$phase" = eager ]; then
  timeout 150 python3 benchmarks/gpu_kernels_check.py --compile-dtypes "" --out "$OUT/kernels.md" 2>&1 | tail -40
  timeout 200 python3 benchmarks/gpu_model_check.py --out "$OUT/model.md" 2>&1 | tail -30
  timeout 330 python3 benchmarks/bench_gpu.py --dtypes fp16,bf16 --repeats 2 --compile-dtypes none \
    --train-variants "baseline,+ cached latents,+ fused AdamW,+ bf16 autocast,+ checkpointing" 2>&1 | tee "$OUT/bench.log" | tail -60
else
  timeout 80 python3 benchmarks/gpu_model_check.py --no-compile --out "$OUT/model.md" 2>&1 | tail -14
  timeout 280 python3 benchmarks/bench_gpu.py --dtypes fp16 --repeats 1 --compile-dtypes fp16 --no-train 2>&1 \
    | tee "$OUT/bench.log" | tail -40
fi
cp docs/benchmarks.md "$OUT/benchmarks.md"
