"""Train a tagger: from a folder of photos (or a manifest) to a calibrated, servable checkpoint.

    python -m model.train --data photos/ --pretrained --out runs/mine
    python -m model.train --data cifar10/train --arch seed_cnn --arch-args '{"widths": [32, 64]}'
    python -m model.train --resume runs/mine
    torchrun --nproc-per-node 2 -m model.train --data photos/ --pretrained --out runs/ddp

A run folder ends up with ``best.safetensors`` (servable; calibrated temperature, per-class
thresholds for multi-label, validation metrics, data fingerprint and this run's TrainConfig in
its card), ``last.safetensors``, ``state.pt`` (everything needed to resume), ``history.csv``,
``metrics.json``, ``report.json`` (skipped photos) and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from model import architectures, data
from model.checkpoint import ModelCard, atomic_write_bytes, save
from model.data import Augment
from model.preprocess import Preprocess

STATE_FILE = "state.pt"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"


@dataclass
class TrainConfig:
    """Everything that defines a run; stored as JSON in the checkpoint's card (``training``)."""

    data: str = ""  # photo folder (class sub-folders, optional train/val/test) or .csv/.jsonl
    out: str = "runs/latest"  # run folder: checkpoints, resumable state, metrics, plots
    arch: str = "efficientnet_lite0"  # architecture name, see model.architectures.available()
    arch_args: dict[str, Any] = field(default_factory=dict)  # builder kwargs, e.g. seed_cnn widths
    pretrained: bool = False  # start efficientnet_lite0 from the shipped ImageNet weights
    weights: str | None = None  # local file of backbone weights (torchvision .pth or checkpoint)
    name: str = ""  # model name in the card; default: the run folder's name
    task: str | None = None  # force single_label/multi_label for a manifest; default: inferred
    epochs: int = 6  # passes over the training split (fine-tuning needs few; early stop may cut)
    batch_size: int = 32  # photos per optimizer step, over all processes together
    optimizer: str = "adamw"  # adamw | sgd (nesterov)
    lr: float = 1e-3  # peak learning rate of the head (of everything, from scratch)
    backbone_lr_scale: float = 0.1  # backbone LR = lr x this, when starting from pretrained weights
    freeze_epochs: int = 2  # pretrained: first epochs train the head only, backbone frozen
    weight_decay: float = 0.05  # AdamW decoupled / SGD L2; never on biases and norm layers
    momentum: float = 0.9  # SGD momentum (nesterov)
    schedule: str = "cosine"  # cosine (warmup, then cosine to 0) | onecycle (linear) | constant
    warmup_epochs: float = 1.0  # linear warmup, in epochs (fractions allowed)
    label_smoothing: float = 0.1  # cross-entropy target smoothing (0 = off)
    ema_decay: float = 0.0  # exponential moving average of weights per step; 0 = off
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    balance: str = "none"  # none | loss (class-weighted loss) | sampler (class-balanced sampling)
    resize: int = 256  # shorter side before the crop (px), also the cache's working size
    crop: int = 224  # square network input (px)
    interpolation: str = "bilinear"  # resize filter: bilinear | bicubic | nearest
    augment: Augment = field(default_factory=Augment)  # training augmentation
    tta_flip: bool = False  # also measure validation with horizontal-flip test-time averaging
    val_fraction: float = 0.2  # of each class held out for validation when there is no val split
    patience: int = 5  # early stopping: epochs without a better validation score; 0 = never
    seed: int = 0  # seeds the split, the initialisation, the sampling and the augmentation
    cache: bool = True  # decode every photo once at the working size and keep it in memory
    workers: int = 2  # data-loading processes (0 = in the main process)
    threads: int = 0  # torch CPU threads (0 = torch's default, one per core)
    amp: bool = True  # mixed precision and channels-last, on CUDA only
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["augment"] = data.Augment(**values.get("augment", {}))
        return cls(**values)

    @property
    def fine_tuning(self) -> bool:
        return self.pretrained or self.weights is not None

    def preprocess(self) -> Preprocess:
        return Preprocess(self.resize, self.crop, interpolation=self.interpolation)


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_setting: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    cuda = device_setting != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(setting: str, ddp: Dist) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ddp.local_rank)
    return device


def broadcast(value: object, ddp: Dist) -> object:
    """Rank 0's ``value`` on every rank."""
    if ddp.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class Log:
    """Progress bars on a terminal, one plain line per epoch otherwise; silent off rank 0."""

    def __init__(self, ddp: Dist):
        self.enabled = ddp.main
        self.tty = self.enabled and sys.stderr.isatty()

    def info(self, message: str) -> None:
        if self.tty:
            tqdm.write(message, file=sys.stdout)
        elif self.enabled:
            print(message, flush=True)

    def bar(self, total: int, desc: str, leave: bool = False) -> tqdm:
        return tqdm(total=total, desc=desc, leave=leave, disable=not self.tty, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def prepare_data(cfg: TrainConfig, log: Log) -> tuple[data.DatasetSpec, data.ImageCache | None]:
    spec = data.load_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, task=cfg.task)
    for path, reason in spec.skipped:
        log.info(f"skipped {path}: {reason}")
    cache = None
    if cfg.cache:
        cache = data.ImageCache(cfg.preprocess())
        paths = [s.path for split in data.SPLITS for s in getattr(spec, split)]
        with log.bar(len(paths), "decoding photos") as bar:
            cache.add(paths, threads=max(2, os.cpu_count() or 2), progress=bar.update)
        data.drop_samples(spec, cache.failed)
        for path, reason in sorted(cache.failed.items()):
            log.info(f"skipped {path}: {reason}")
        log.info(f"cached {len(cache.images)} photos ({cache.nbytes() / 2**20:.0f} MiB uint8)")
    log.info(
        f"{spec.num_classes} classes, {spec.task}: {len(spec.train)} train, {len(spec.val)} val, "
        f"{len(spec.test)} test photos; {len(spec.skipped)} skipped"
    )
    return spec, cache


class BalancedSampler(Sampler[int]):
    """Indices drawn with replacement, each class equally likely; this rank's share of them."""

    def __init__(self, weights: torch.Tensor, ddp: Dist, seed: int):
        self.weights = weights
        self.ddp = ddp
        self.seed = seed
        self.epoch = 0
        self.per_rank = math.ceil(len(weights) / ddp.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(
            self.weights, self.per_rank * self.ddp.world, replacement=True, generator=generator
        )
        return iter(drawn[self.ddp.rank :: self.ddp.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def photo_classes(sample: data.Sample) -> list[int]:
    return [sample.target] if isinstance(sample.target, int) else list(sample.target)


def class_counts(spec: data.DatasetSpec) -> torch.Tensor:
    counts = torch.zeros(spec.num_classes)
    for sample in spec.train:
        counts[photo_classes(sample)] += 1
    return counts


def make_sampler(spec: data.DatasetSpec, cfg: TrainConfig, ddp: Dist) -> Sampler[int]:
    if cfg.balance == "sampler":
        inverse = 1.0 / class_counts(spec).clamp_min(1)
        weights = torch.tensor(
            [
                float(inverse[classes].mean()) if (classes := photo_classes(s)) else 1.0
                for s in spec.train
            ]
        )  # a multi-label photo without tags weighs as much as one of a single-photo class
        return BalancedSampler(weights, ddp, cfg.seed)
    return DistributedSampler(
        range(len(spec.train)), num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.seed
    )


class TrainBatches:
    """One epoch of augmented training batches ``(images (B, 3, crop, crop), targets)``.

    When every cached photo has the same size and the augmentation is only shifts and flips
    (CIFAR-like sets), whole batches are augmented as tensors; otherwise a DataLoader runs
    :func:`data.build_train_transform` per photo.
    """

    def __init__(self, spec, cache, cfg: TrainConfig, ddp: Dist):
        self.spec, self.cfg = spec, cfg
        self.pre = cfg.preprocess()
        self.sampler = make_sampler(spec, cfg, ddp)
        self.batch_size = max(1, cfg.batch_size // ddp.world)
        self.stack = cache.stack(spec.train) if cache and cfg.augment.batchable else None
        self.dataset = data.PhotoDataset(
            spec.train,
            spec.num_classes,
            spec.task,
            data.build_train_transform(self.pre, cfg.augment),
            cache,
        )
        self.targets = self.dataset.targets()

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest > 1)  # a batch of one photo would break batch norm: dropped

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        if self.stack is not None:
            return self._tensor_batches()
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            drop_last=len(self.sampler) % self.batch_size == 1,
            worker_init_fn=_seed_worker,
        )
        return iter(loader)

    def _tensor_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = data.augment_batch(self.stack[index], self.pre, self.cfg.augment)
            yield images, self.targets[index]


def _seed_worker(worker_id: int) -> None:
    random.seed(torch.initial_seed() % 2**32)  # torch seeds each worker; Python's random too


def eval_batches(
    samples: list[data.Sample], spec, cache, pre: Preprocess, batch_size: int, workers: int
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function giving ``(images, targets)`` batches through ``build_eval_transform(pre)``."""
    loader = data.make_eval_loader(
        samples, spec.num_classes, spec.task, pre, batch_size, workers, cache
    )
    return lambda: iter(loader)


# --------------------------------------------------------------------------------------------
# Network, optimizer, schedule
# --------------------------------------------------------------------------------------------


def build_network(cfg: TrainConfig, num_classes: int) -> architectures.TaggerNet:
    net = architectures.build(cfg.arch, num_classes, **effective_arch_args(cfg))
    if cfg.pretrained:
        if cfg.arch != "efficientnet_lite0":
            raise SystemExit(
                f"--pretrained uses the shipped efficientnet_lite0 weights; for {cfg.arch} pass "
                "--weights FILE (a local file of its backbone weights)"
            )
        architectures.load_backbone_weights(net, architectures.load_shipped_lite0())
    elif cfg.weights:
        architectures.load_backbone_weights(net, read_weights(cfg.weights))
    return net


def effective_arch_args(cfg: TrainConfig) -> dict[str, Any]:
    """The builder arguments for the card: ``seed_cnn`` gets ``input_size`` = the crop size."""
    args = dict(cfg.arch_args)
    args.pop("weights", None)  # a local path never goes into the card
    if cfg.arch == "seed_cnn":
        args.setdefault("input_size", cfg.crop)
    return args


def read_weights(path: str) -> dict[str, torch.Tensor]:
    state = architectures.load_weights_file(path)
    if any(key.startswith("_blocks.") for key in state):  # the original EfficientNet-Lite0 names
        return architectures.load_shipped_lite0(path)
    return state


def param_groups(net: architectures.TaggerNet, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone and head, each split into decayed weights and undecayed biases/norms; every group
    carries its ``lr_scale`` (the backbone's is lower when fine-tuning)."""
    backbone_scale = cfg.backbone_lr_scale if cfg.fine_tuning else 1.0
    groups = []
    for module, scale in ((net.features, backbone_scale), (net.head, 1.0)):
        params = list(module.parameters())
        for decay, chosen in (
            (True, [p for p in params if p.ndim > 1]),
            (False, [p for p in params if p.ndim <= 1]),
        ):
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "lr": cfg.lr * scale,
                        "lr_scale": scale,
                    }
                )
    return groups


def make_optimizer(net: architectures.TaggerNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(net, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise SystemExit(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")


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
    raise SystemExit(f"--schedule must be cosine, onecycle or constant, got {schedule!r}")


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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What changes from epoch to epoch (saved in the state file)."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False


class Trainer:
    def __init__(self, cfg: TrainConfig, ddp: Dist, log: Log):
        self.cfg, self.ddp, self.log = cfg, ddp, log
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device, ddp)
        self.cuda = self.device.type == "cuda"
        self.amp = cfg.amp and self.cuda
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed + ddp.rank)
        random.seed(cfg.seed + ddp.rank)
        self.spec, self.cache = prepare_data(cfg, log)
        self.pre = cfg.preprocess()
        self.train_batches = TrainBatches(self.spec, self.cache, cfg, ddp)
        self.val_batches = eval_batches(
            self.spec.val, self.spec, self.cache, self.pre, 2 * cfg.batch_size, cfg.workers
        )
        self.net = build_network(cfg, self.spec.num_classes).to(self.device)
        if self.amp:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.net, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.train_batches))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = (
            AveragedModel(
                self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
            if cfg.ema_decay > 0
            else None
        )
        self.loss_fn = loss_function(self.spec, cfg, self.device)
        self.progress = Progress()

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "progress": asdict(self.progress),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.cuda else [],
                "python": list(random.getstate()[1]),
            },
            "fingerprint": self.spec.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.spec.fingerprint:
            self.log.info("warning: the photo set changed since this run started")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.progress = Progress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.cuda and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        python_state = random.getstate()
        random.setstate((python_state[0], tuple(state["rng"]["python"]), python_state[2]))

    def save_state(self) -> None:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(self.out / STATE_FILE, buffer.getvalue())

    # ---- training ----------------------------------------------------------------------------

    def frozen(self, epoch: int) -> bool:
        """Fine-tuning starts with the head alone: a fresh head's large gradients would
        otherwise wreck the pretrained features before it has learned anything."""
        return self.cfg.fine_tuning and epoch < self.cfg.freeze_epochs

    def model_for(self, epoch: int) -> nn.Module:
        """The network in train mode for ``epoch`` (backbone frozen or not), DDP-wrapped in a
        torchrun job; the wrapper is rebuilt per epoch since freezing changes what it syncs."""
        frozen = self.frozen(epoch)
        self.net.train()
        self.net.features.requires_grad_(not frozen)
        if frozen:
            self.net.features.eval()  # keep the pretrained batch-norm statistics
        if self.ddp.world == 1:
            return self.net
        ids = [self.device.index] if self.cuda else None
        return DistributedDataParallel(self.net, device_ids=ids)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        model = self.model_for(epoch)
        total_loss, correct, seen, started = 0.0, 0.0, 0, time.perf_counter()
        with self.log.bar(len(self.train_batches), f"epoch {epoch + 1}") as bar:
            for images, targets in self.train_batches.epoch(epoch):
                loss, hits = self.step(model, images, targets)
                total_loss += loss * len(targets)
                correct += hits
                seen += len(targets)
                rate = seen * self.ddp.world / (time.perf_counter() - started)
                bar.update()
                bar.set_postfix(
                    loss=f"{total_loss / seen:.3f}",
                    acc=f"{correct / seen:.3f}",
                    img_s=f"{rate:.0f}",
                )
        seconds = time.perf_counter() - started
        return {
            "train_loss": total_loss / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "images_per_s": seen * self.ddp.world / seconds,
            "seconds": seconds,
        }

    def step(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[float, float]:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.amp:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = model(images)  # (B, C)
            loss = self.loss_fn(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.net)
        return loss.item(), float(hits(logits.detach(), targets, self.spec.task))

    # ---- validation --------------------------------------------------------------------------

    @property
    def eval_net(self) -> architectures.TaggerNet:
        return self.ema.module if self.ema else self.net

    @torch.no_grad()  # not inference_mode: the logits feed the temperature fit's autograd
    def predict(
        self, batches, net: nn.Module | None = None, tta: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C) on the CPU, targets) over ``batches()``; ``tta`` averages the logits of
        each photo and its mirror image."""
        net = (net or self.eval_net).eval()
        all_logits, all_targets = [], []
        for images, targets in batches():
            images = images.to(self.device)
            if self.amp:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = net(images).float()
                if tta:
                    logits = (logits + net(images.flip(-1)).float()) / 2
            all_logits.append(logits.cpu())
            all_targets.append(targets)
        return torch.cat(all_logits), torch.cat(all_targets)

    def validate(self) -> dict[str, float]:
        logits, targets = self.predict(self.val_batches)
        row = {"val_loss": float(self.loss_fn(logits, targets))}
        if self.spec.task == "single_label":
            row["val_acc"] = float((logits.argmax(1) == targets).float().mean())
            if self.cfg.tta_flip:
                tta_logits, _ = self.predict(self.val_batches, tta=True)
                row["val_acc_tta"] = float((tta_logits.argmax(1) == targets).float().mean())
        else:
            from model import metrics

            row["val_mAP"] = metrics.multilabel_metrics(
                torch.sigmoid(logits), targets, self.spec.classes
            )["mAP"]
        return row

    def score(self, row: dict[str, float]) -> float:
        return row["val_acc"] if self.spec.task == "single_label" else row["val_mAP"]

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, on_epoch_end: Callable[[int], None] | None = None) -> None:
        """Train to ``cfg.epochs`` or an early stop; ``on_epoch_end(epochs_done)`` after each."""
        progress = self.progress
        epochs_bar = self.log.bar(self.cfg.epochs, "epochs", leave=True)
        epochs_bar.update(progress.epoch)
        while progress.epoch < self.cfg.epochs and not progress.stopped_early:
            epoch = progress.epoch
            row = {"epoch": epoch + 1, "phase": "head" if self.frozen(epoch) else "all"}
            row["lr"] = self.optimizer.param_groups[-1]["lr"]
            row.update(self.train_epoch(epoch))
            progress.epoch += 1
            stop = self.end_epoch(row) if self.ddp.main else False
            progress.stopped_early = bool(broadcast(stop, self.ddp))
            epochs_bar.update()
            epochs_bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith("val_")})
            if on_epoch_end:
                on_epoch_end(progress.epoch)
        epochs_bar.close()
        if progress.stopped_early:
            self.log.info(
                f"stopped early: no better validation score for {self.cfg.patience} epochs"
            )

    def end_epoch(self, row: dict[str, Any]) -> bool:
        """Rank 0: validate, write the best/last checkpoints, then the state file (last, so a
        state always has its checkpoints). True when it is time to stop early."""
        row.update(self.validate())
        progress = self.progress
        progress.train_seconds += row["seconds"]
        progress.history.append(row)
        score, loss = self.score(row), row["val_loss"]
        improved = score > progress.best_score or (
            score == progress.best_score and loss < progress.best_loss
        )
        card = self.card(metrics=self.epoch_metrics(row))
        if improved:
            progress.best_score, progress.best_loss, progress.best_epoch = score, loss, row["epoch"]
            save(self.out / BEST_FILE, self.eval_net, card)
        save(self.out / LAST_FILE, self.eval_net, card)
        write_history(self.out / "history.csv", progress.history)
        patience = self.cfg.patience
        progress.stopped_early = patience > 0 and row["epoch"] - progress.best_epoch >= patience
        self.save_state()
        self.log.info(epoch_line(row, self.cfg.epochs, improved))
        return progress.stopped_early

    def epoch_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k.startswith("val_")} | {"epoch": row["epoch"]}

    def card(self, **fields: Any) -> ModelCard:
        cfg = self.cfg
        training = cfg.to_dict()
        if cfg.weights:
            training["weights"] = Path(cfg.weights).name
        values = {
            "name": cfg.name or self.out.resolve().name,
            "arch": cfg.arch,
            "arch_args": effective_arch_args(cfg),
            "classes": self.spec.classes,
            "task": self.spec.task,
            "preprocess": self.pre,
            "data_fingerprint": self.spec.fingerprint,
            "training": training,
            "description": f"{cfg.arch} trained by phototag-train on {Path(cfg.data).name}",
        }
        return ModelCard(**(values | fields))


def hits(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Correct predictions in a batch: top-1 (single-label) or per-tag at 0.5, averaged over
    tags (multi-label)."""
    if task == "single_label":
        return (logits.argmax(1) == targets).sum()
    return ((logits > 0) == (targets > 0.5)).float().mean(1).sum()


def epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}/{epochs} ({row['phase']})"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_acc_tta", "val_mAP"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.2e} {row['images_per_s']:.0f} img/s {row['seconds']:.1f}s")
    return " ".join(parts) + (" *" if improved else "")


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


# --------------------------------------------------------------------------------------------
# End of a run: calibration, metrics, plots, report
# --------------------------------------------------------------------------------------------


def finalize(trainer: Trainer) -> dict[str, Any]:
    """Calibrate the best checkpoint on the validation split, measure it (and the test split),
    write its final card, ``metrics.json``, ``report.json`` and the plots; return the metrics."""
    from model import checkpoint, metrics, plots

    out, spec = trainer.out, trainer.spec
    best = checkpoint.load(out / BEST_FILE)
    net = best.build_model(trainer.device)  # exactly the served tensors
    logits, targets = trainer.predict(trainer.val_batches, net)
    if spec.task == "single_label":
        val, calibration = calibrated_single_label(logits, targets, spec.classes)
        if trainer.cfg.tta_flip:
            tta_logits, _ = trainer.predict(trainer.val_batches, net, tta=True)
            val["accuracy_tta"] = float((tta_logits.argmax(1) == targets).float().mean())
        plots.plot_confusion(val["confusion_matrix"], spec.classes, out / "confusion.png")
        plots.plot_reliability(
            calibration["bins_before"], calibration["bins_after"], out / "reliability.png"
        )
    else:
        probs = torch.sigmoid(logits)
        calibration = {"temperature": 1.0, "thresholds": metrics.tune_thresholds(probs, targets)}
        val = metrics.multilabel_metrics(probs, targets, spec.classes, calibration["thresholds"])
    results: dict[str, Any] = {"val": val}
    if spec.test:
        results["test"] = measure_split(trainer, net, spec.test, calibration)
    progress = trainer.progress
    results["training"] = {
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "stopped_early": progress.stopped_early,
        "train_seconds": round(progress.train_seconds, 1),
        "world_size": trainer.ddp.world,
        "device": str(trainer.device),
    }
    card = trainer.card(
        temperature=calibration["temperature"],
        thresholds=calibration.get("thresholds"),
        metrics=card_metrics(results),
    )
    save(out / BEST_FILE, best.state_dict, card)
    write_json(out / "metrics.json", results)
    write_json(out / "report.json", run_report(trainer))
    plots.plot_history(progress.history, out / "history.png")
    return results


def calibrated_single_label(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the temperature-scaled probabilities (what the server returns), with ECE
    before and after scaling, and the reliability bins of both."""
    from model import metrics

    temperature = metrics.fit_temperature(logits, labels)
    before = torch.softmax(logits, 1)
    after = torch.softmax(logits / temperature, 1)
    val = metrics.classification_metrics(after, labels, classes)
    bins_before = metrics.reliability_bins(before, labels)
    val |= {"temperature": temperature, "ece_before": bins_before["ece"], "ece_after": val["ece"]}
    calibration = {
        "temperature": temperature,
        "bins_before": bins_before,
        "bins_after": metrics.reliability_bins(after, labels),
    }
    return val, calibration


def measure_split(trainer: Trainer, net: nn.Module, samples, calibration) -> dict[str, Any]:
    from model import metrics

    spec, cfg = trainer.spec, trainer.cfg
    batches = eval_batches(
        samples, spec, trainer.cache, trainer.pre, 2 * cfg.batch_size, cfg.workers
    )
    logits, targets = trainer.predict(batches, net)
    if spec.task == "single_label":
        probs = torch.softmax(logits / calibration["temperature"], 1)
        return metrics.classification_metrics(probs, targets, spec.classes)
    probs = torch.sigmoid(logits)
    return metrics.multilabel_metrics(probs, targets, spec.classes, calibration["thresholds"])


CARD_METRIC_KEYS = (
    "num_samples", "accuracy", "accuracy_tta", "top5", "macro_f1", "micro_f1", "mAP", "nll",
    "ece_before", "ece_after", "ece", "exact_match",
)  # fmt: skip


def card_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers for the card (per-class detail stays in metrics.json)."""
    summary: dict[str, Any] = {}
    for split in ("val", "test"):
        for key in CARD_METRIC_KEYS:
            if key in results.get(split, {}):
                summary[f"{split}_{key}"] = results[split][key]
    return summary | {"best_epoch": results["training"]["best_epoch"]}


def run_report(trainer: Trainer) -> dict[str, Any]:
    spec = trainer.spec
    return {
        "data": trainer.cfg.data,
        "fingerprint": spec.fingerprint,
        "classes": spec.classes,
        "task": spec.task,
        "counts": {split: len(getattr(spec, split)) for split in data.SPLITS},
        "skipped": [{"path": path, "reason": reason} for path, reason in spec.skipped],
        "cache_bytes": trainer.cache.nbytes() if trainer.cache else 0,
        "config": trainer.cfg.to_dict(),
    }


def write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, default=float).encode())


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The last complete state of a run (written atomically; tensors and plain values only)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise data.DataError(
            f"{path} does not exist: the run has no complete epoch to resume from; start it again"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of a write that a kill interrupted; never read, safe to delete."""
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Trainer:
    """Run (or resume) training and finalize the run folder; return the trainer."""
    state = None
    if resume is not None:
        state = read_state(resume)
        cfg = TrainConfig.from_dict(state["config"])
        cfg.out = str(resume)  # the folder may have been moved since
    assert cfg is not None
    ddp = init_distributed(cfg.device)
    try:
        log = Log(ddp)
        if ddp.main and Path(cfg.out).is_dir():
            remove_stale_temp_files(Path(cfg.out))
        trainer = Trainer(cfg, ddp, log)
        if state is not None:
            trainer.load_state_dict(state)
            log.info(f"resuming {cfg.out} after epoch {trainer.progress.epoch}")
        trainer.fit(on_epoch_end)
        if ddp.main:
            results = finalize(trainer)
            log.info(summary_line(results, Path(cfg.out)))
        return trainer
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def summary_line(results: dict[str, Any], out: Path) -> str:
    val = results["val"]
    if "accuracy" in val:
        score = f"val accuracy {val['accuracy']:.4f}"
        if "accuracy_tta" in val:
            score += f" (flip TTA {val['accuracy_tta']:.4f})"
        score += (
            f", ECE {val['ece_before']:.4f} -> {val['ece_after']:.4f} at T={val['temperature']:.3f}"
        )
    else:
        score = f"val mAP {val['mAP']:.4f}, macro F1 {val['macro_f1']:.4f}"
    seconds = results["training"]["train_seconds"]
    return f"done: {score}; {seconds:.0f}s training; best checkpoint {out / BEST_FILE}"


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line comment in the dataclass source: the config documents itself once."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+): [^#]+#\s*(.+)$")
    matches = (pattern.match(line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2) for m in matches if m}


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    helps = field_help(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {json.dumps(default)})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, dict):
            parser.add_argument(flag, type=json.loads, metavar="JSON", help=text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, help=text)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig | None, str | None]:
    parser = argparse.ArgumentParser(
        prog="phototag-train",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,  # only the flags given override the config defaults
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    add_config_flags(parser, TrainConfig, skip=("augment",))
    add_config_flags(parser.add_argument_group("augmentation"), data.Augment)
    given = vars(parser.parse_args(argv))
    resume = given.pop("resume", None)
    if resume is not None:
        return None, resume
    if "data" not in given:
        parser.error("--data is required (a photo folder or a .csv/.jsonl manifest)")
    augment_names = {f.name for f in fields(data.Augment)}
    augment = data.Augment(**{k: v for k, v in given.items() if k in augment_names})
    cfg = TrainConfig(**{k: v for k, v in given.items() if k not in augment_names}, augment=augment)
    if cfg.arch == "seed_cnn" and "crop" not in given:  # a small from-scratch net: small input
        cfg.crop = int(cfg.arch_args.get("input_size", 32))
        cfg.resize = given.get("resize", cfg.crop)
    return cfg, resume


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    try:
        train(cfg, resume=resume)
    except data.DataError as exc:
        print(f"phototag-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
