"""The photos of a run: the split and the cache, the samplers, and batches for training and
for validation."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from model import data
from model.preprocess import Preprocess
from model.runtime import ConfigError
from model.training.config import TrainConfig
from model.training.processes import Dist, Log


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
        if cfg.augment.alternate_flip and self.stack is None:
            raise ConfigError(
                "--alternate-flip: needs the batched augmentation, which needs --cache and "
                "training photos that all decode to one size (set --resize equal to --crop)"
            )
        self.dataset = data.PhotoDataset(
            spec.train,
            spec.num_classes,
            spec.task,
            data.build_train_transform(self.pre, cfg.augment),
            cache,
        )
        self.targets = self.dataset.targets()
        # alternating flips: each photo's flip in even epochs, drawn once; odd epochs invert it
        generator = torch.Generator().manual_seed(cfg.seed)
        self.first_flips = torch.rand(len(spec.train), generator=generator) < 0.5

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest > 1)  # a batch of one photo would break batch norm: dropped

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        if self.stack is not None:
            return self._tensor_batches(epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            drop_last=len(self.sampler) % self.batch_size == 1,
            worker_init_fn=_seed_worker,
        )
        return iter(loader)

    def _tensor_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler))
        aug = self.cfg.augment
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            flips = self.flips(index, epoch) if aug.alternate_flip else None
            images = data.augment_batch(self.stack[index], self.pre, aug, flips)
            yield images, self.targets[index]

    def flips(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Alternating flips: which of these photos are mirrored in ``epoch``. Every photo is
        seen both ways in every two epochs, where random flips leave a quarter one way only."""
        return self.first_flips[index] ^ bool(epoch % 2)


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
