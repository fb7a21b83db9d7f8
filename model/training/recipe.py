"""A run's recipe: the network it starts from, its optimizer, LR schedule and loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from model import architectures, data
from model.runtime import ConfigError
from model.training.batches import class_counts
from model.training.config import TrainConfig


def build_network(cfg: TrainConfig, num_classes: int) -> architectures.TaggerNet:
    """The network, its backbone from ``cfg.weights_source`` (registered weights or a file)."""
    return architectures.build(
        cfg.arch, num_classes, weights=cfg.weights_source, **effective_arch_args(cfg)
    )


def effective_arch_args(cfg: TrainConfig) -> dict[str, Any]:
    """The builder arguments for the card: ``seed_cnn`` gets ``input_size`` = the crop size."""
    args = dict(cfg.arch_args)
    if cfg.arch == "seed_cnn":
        args.setdefault("input_size", cfg.crop)
    return args


def param_groups(net: architectures.TaggerNet, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone and head, each split into decayed weights, undecayed biases and undecayed
    batch-norm parameters; every group carries its ``lr_scale`` (the backbone's is lower when
    fine-tuning, batch norm's ``norm_lr_scale`` times higher). Frozen parameters are left out."""
    backbone_scale = cfg.backbone_lr_scale if cfg.fine_tuning else 1.0
    groups = []
    for module, scale in ((net.features, backbone_scale), (net.head, 1.0)):
        norms = {
            id(p) for m in module.modules() if isinstance(m, _BatchNorm) for p in m.parameters()
        }
        params = [p for p in module.parameters() if p.requires_grad]
        for decay, group_scale, chosen in (
            (True, scale, [p for p in params if p.ndim > 1]),
            (False, scale, [p for p in params if p.ndim <= 1 and id(p) not in norms]),
            (False, scale * cfg.norm_lr_scale, [p for p in params if id(p) in norms]),
        ):
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "lr": cfg.lr * group_scale,
                        "lr_scale": group_scale,
                    }
                )
    return groups


def make_optimizer(net: architectures.TaggerNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(net, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ConfigError(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` of ``total``."""
    if step < warmup:
        start = 1 / 25 if schedule == "onecycle" else 0.0
        return start + (1 - start) * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)

    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        return max(0.0, 1 - progress)
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"--schedule must be cosine, onecycle or constant, got {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule)
    )


def loss_function(spec: data.DatasetSpec, cfg: TrainConfig, device: torch.device) -> Callable:
    counts = class_counts(spec)
    weights = None
    if cfg.balance == "loss":
        weights = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(device)
    if spec.task == "single_label":
        return lambda logits, y: F.cross_entropy(
            logits, y, weight=weights, label_smoothing=cfg.label_smoothing
        )
    pos_weight = None
    if cfg.balance == "loss":  # positives of rare tags count more: negatives / positives
        pos_weight = ((len(spec.train) - counts) / counts.clamp_min(1)).to(device)

    def multilabel(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        smoothed = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        return F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=pos_weight)

    return multilabel
