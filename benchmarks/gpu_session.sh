#!/usr/bin/env bash
# The prepared GPU session (see benchmarks/gpu_session.py): training, the seed's job, inference, within a budget.
#   bash benchmarks/gpu_session.sh                    # on the lent GPU machine (carry data/pokemon and .whl)
#   bash benchmarks/gpu_session.sh --dry-run          # on a CPU, toy shapes: every part end to end
#   bash benchmarks/gpu_session.sh --parts inference  # one part (training | seed-job | inference)
# Wheels the machine lacks (diffusers, einops, ...) are installed from .whl/ when present (the GPU machine has no
# network). Logs, tables and docs/benchmarks.md with the new sections go to $OUT (or out/).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
case " $* " in
  *" --dry-run "*) ;;
  *) nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" ;;
esac
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__); import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
python3 benchmarks/gpu_session.py "$@"
