#!/usr/bin/env bash
# Train seed_cnn from scratch on CIFAR-10's 50,000 training photos (10% held out for validation).
#   bench/train_cifar10.sh OUT       -> OUT/best.safetensors, val_evaluation.json, plots, wall time
# Every technique is a flag of the trainer or an argument of seed_cnn (see bench/README.md):
# a BN-ReLU VGG-style net pooling after each block's first conv, SGD with nesterov, one-cycle
# LR, label smoothing 0.2, flip + 4 px shift augmentation on batched tensors, flip TTA.
set -euo pipefail
out=${1:?usage: bench/train_cifar10.sh OUT}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
data=${DATA:-../shared/data/cifar10/train}
python=${PYTHON:-.venv/bin/python}
# Shared cores: OpenMP threads that sleep instead of spinning while they wait for each other
# keep two-thread torch from stalling when other processes hold a core.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
epochs=${EPOCHS:-18}
[[ -d $data ]] || { echo "no photo set at $data (see ../shared/data/README.md)" >&2; exit 1; }
net='{"widths": [32, 64, 128], "convs_per_block": 2, "pool_first": true, "batch_norm": true,
      "hidden": [], "dropout": 0.1}'
start=$(date +%s)
"$python" -m model.train --data "$data" --out "$out" --arch seed_cnn --arch-args "$net" \
  --resize 32 --crop 32 --val-fraction 0.1 --epochs "$epochs" --batch-size 256 \
  --optimizer sgd --lr 0.2 --momentum 0.9 --weight-decay 5e-4 --schedule onecycle \
  --warmup-epochs 1 --label-smoothing 0.2 --grad-clip 0 --patience 0 \
  --no-random-resized-crop --color-jitter 0 --hflip --translate 0.125 --tta-flip \
  "${@:2}"
echo "wall time: $(($(date +%s) - start)) s (photos decoded, trained, calibrated, plotted)"
