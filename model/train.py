"""Train a tagger: from a folder of photos (or a manifest) to a calibrated, servable checkpoint.

    python -m model.train --data photos/ --pretrained --out runs/mine
    python -m model.train --data cifar10/train --arch seed_cnn --arch-args '{"widths": [32, 64]}'
    python -m model.train --resume runs/mine
    torchrun --nproc-per-node 2 -m model.train --data photos/ --pretrained --out runs/ddp

A run folder ends up with ``best.safetensors`` (servable; calibrated temperature, per-class
thresholds for multi-label, validation metrics, data fingerprint and this run's TrainConfig in
its card), ``last.safetensors``, ``state.pt`` (everything needed to resume), ``history.csv``,
``val_evaluation.json`` (and ``test_evaluation.json`` with a test split, ``val_tta_`` with
``--tta-flip``: the shape ``phototag-evaluate`` writes) with their plots, ``report.json`` (counts,
skipped photos, how the run went) and ``history.png``.

The code lives in :mod:`model.training`; this module is its public face (``phototag-train``).
"""

from __future__ import annotations

import sys

from model.training.batches import BalancedSampler, TrainBatches, make_sampler, prepare_data
from model.training.cli import main, parse_args
from model.training.config import TrainConfig
from model.training.loop import BEST_FILE, LAST_FILE, STATE_FILE, Trainer
from model.training.processes import Dist, Log
from model.training.recipe import build_network, effective_arch_args, loss_function, lr_factor
from model.training.run import train

__all__ = [
    "BEST_FILE",
    "LAST_FILE",
    "STATE_FILE",
    "BalancedSampler",
    "Dist",
    "Log",
    "TrainBatches",
    "TrainConfig",
    "Trainer",
    "build_network",
    "effective_arch_args",
    "loss_function",
    "lr_factor",
    "main",
    "make_sampler",
    "parse_args",
    "prepare_data",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
