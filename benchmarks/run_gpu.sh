#!/usr/bin/env bash
# The issue's GPU figures in one go (one H100 / H200: about 5 minutes without --compile's first compilation).
# Usage: bash benchmarks/run_gpu.sh OUT_DIR [CIFAR_ROOT]   (OUT_DIR must not hold earlier results)
set -euo pipefail
OUT="${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR [CIFAR_ROOT]}"
CIFAR="${2:-}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python benchmarks/throughput.py --device cuda --backbone vit_base_patch16_224 --batch-size 128 --resolution 224 \
  --tasks-finished 0 49 --modes fast,resum,paper --steps 20 --warmup 5 --out "$OUT/throughput.json" | tee "$OUT/throughput.txt"
python benchmarks/throughput.py --device cuda --backbone vit_base_patch16_224 --batch-size 128 --resolution 224 \
  --tasks-finished 0 49 --modes fast --augment --steps 20 --warmup 5 --out "$OUT/throughput_augment.json" | tee "$OUT/throughput_augment.txt"
python benchmarks/throughput.py --device cuda --backbone vit_base_patch16_224 --batch-size 128 --resolution 224 \
  --tasks-finished 0 49 --modes fast --compile --steps 20 --warmup 5 --out "$OUT/throughput_compile.json" | tee "$OUT/throughput_compile.txt"
python benchmarks/dataloader.py --device cuda --resolution 224 --batch-size 128 --batches 50 --num-workers 8 --images 50000 \
  --folder-images 2048 ${CIFAR:+--cifar-root "$CIFAR"} --out "$OUT/dataloader.json" | tee "$OUT/dataloader.txt"
