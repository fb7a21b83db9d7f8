#!/usr/bin/env bash
# Train seed_cnn from scratch on CIFAR-10 with airbench's recipe; see bench/train_cifar10.py.
#   bench/train_cifar10.sh OUT [extra trainer flags]   (EPOCHS=N, DATA=DIR, PYTHON=...)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/train_cifar10.py "$@"
