#!/bin/bash
# The CUDA half: on a machine with an NVIDIA GPU and PyTorch (no MLX), check the forked
# forward on CUDA, time the torch runners against TRL and, with 2+ GPUs, data parallel.
# Wheels missing there (trl, datasets, array-api-compat, ...) are expected in .whl/;
# results go to $OUT (or ./gpu-out).
set -o pipefail
OUT=${OUT:-gpu-out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, trl; print(torch.__version__, transformers.__version__, peft.__version__, trl.__version__, torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider tests/test_prefix_sharing.py tests/test_train.py \
  -k "not mlx" 2>&1 | tail -4 | tee "$OUT/tests.log"
python3 -m benchmarks.bench --out /tmp/bench --no-mlx --no-sweep "$@" 2>&1 | tee "$OUT/bench.log"
cp /tmp/bench/results.json /tmp/bench/results.md "$OUT/" 2>/dev/null
# Data parallel across the GPUs (torchrun, NCCL): W GPUs vs 1 on the small fixture, LoRA;
# one line and nothing else on a machine with a single GPU.
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
  python3 -m benchmarks.bench --out /tmp/bench-dp --no-mlx --data-parallel 3 --world "$GPUS" \
    --steps 8 --warmup 2 2>&1 | tee "$OUT/data-parallel.log"
  cp /tmp/bench-dp/data-parallel.json "$OUT/" 2>/dev/null
else
  echo "multi-GPU data-parallel row skipped: $GPUS GPU on this machine" | tee "$OUT/data-parallel.log"
fi
