#!/usr/bin/env bash
# The prepared GPU run (issue #6): ResNet-50, bf16 autocast, channels_last, batch 256, the same
# ratios as on CPU plus model FLOP utilisation (8.2 GFLOP per image; H200 dense bf16 989 TFLOP/s).
# Random weights: the GPU machine has no internet, and throughput does not depend on them.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (needs the package installed: make .venv/bin/.installed)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench-gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" benchmarks/bench.py --model resnet50 --weights random --device cuda --precision bf16 \
    --batch 256 --crop 224 --images 16384 --shard-size 4096 --seconds 5 --rounds 3 \
    --gflops 8.2 --peak-tflops 989 --json "$OUT/resnet50-bf16.json" | tee "$OUT/resnet50-bf16.txt"
# real-photo JPEGs (issue #16): 12 MP phone-camera photos, decoded on the GPU (nvJPEG, batched,
# resized there: decode auto) vs on the CPU cores (DCT-scaled libjpeg: decode scaled)
for DEC in auto scaled; do
  "$PY" benchmarks/bench.py --model resnet50 --weights random --device cuda --precision bf16 \
      --batch 256 --crop 224 --images 2048 --shard-size 1024 --seconds 5 --rounds 2 \
      --data photos --photo-size 4000x3000 --decode "$DEC" --gflops 8.2 --peak-tflops 989 \
      --json "$OUT/photos-12mp-$DEC.json" | tee "$OUT/photos-12mp-$DEC.txt"
done
# the auto batch size / OOM halving and fine-tuning paths on CUDA, briefly
"$PY" -m pytest -q -m gpu tests/ | tee "$OUT/pytest-gpu.txt"
# pretraining (issue #18): ResNet-18 SimCLR, bf16 autocast, DDP over every GPU of this machine
NGPU=$(nvidia-smi -L | wc -l)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    benchmarks/pretrain_throughput.py --arch resnet18 --image-size 224 --batch-size 512 \
    --epochs 2 --images 20480 --out "$OUT/pretrain-run" --json "$OUT/pretrain-resnet18-simclr.json" \
    | tee "$OUT/pretrain-resnet18-simclr.txt"
# BYOL (issue #25): the same, with its momentum target (one more forward pass per view)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    benchmarks/pretrain_throughput.py --method byol --arch resnet18 --image-size 224 \
    --batch-size 512 --epochs 2 --images 20480 --out "$OUT/pretrain-byol-run" \
    --json "$OUT/pretrain-resnet18-byol.json" | tee "$OUT/pretrain-resnet18-byol.txt"
