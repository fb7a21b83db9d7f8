#!/usr/bin/env bash
# Fine-tune the default pretrained EfficientNet-Lite0 on ants-bees with the CLI's default flags.
#   bench/train_ants_bees.sh OUT     -> OUT/best.safetensors, val_evaluation.json, plots, wall time
# DATA and PYTHON may be overridden; the photo set is read-only material beside the repo.
set -euo pipefail
out=${1:?usage: bench/train_ants_bees.sh OUT}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
data=${DATA:-../shared/data/ants-bees/train}
python=${PYTHON:-.venv/bin/python}
# Shared cores: OpenMP threads that sleep instead of spinning while they wait for each other
# keep two-thread torch from stalling when other processes hold a core.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[[ -d $data ]] || { echo "no photo set at $data (see ../shared/data/README.md)" >&2; exit 1; }
start=$(date +%s)
"$python" -m model.train --data "$data" --pretrained --out "$out"
echo "wall time: $(($(date +%s) - start)) s (photos decoded, trained, calibrated, plotted)"
