"""The training loop: one Trainer holds the network, optimizer, schedule and progress of a run,
trains it epoch by epoch, validates, and writes the checkpoints and the resumable state."""

from __future__ import annotations

import csv
import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model import architectures, evaluate
from model.checkpoint import ModelCard, atomic_write_bytes, save
from model.runtime import resolve_device
from model.training.batches import TrainBatches, eval_batches, prepare_data
from model.training.config import TrainConfig
from model.training.lookahead import Lookahead
from model.training.processes import Dist, Log, broadcast
from model.training.recipe import (
    build_network,
    effective_arch_args,
    loss_function,
    make_optimizer,
    make_scheduler,
)

STATE_FILE = "state.pt"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
WHITENING_PHOTOS = 5000  # photos a PatchWhitening layer is fitted on (airbench's count)


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
        self.device = resolve_device(cfg.device, ddp.local_rank)
        self.cuda = self.device.type == "cuda"
        self.amp = cfg.amp if self.cuda else cfg.cpu_amp  # float16 on CUDA, bfloat16 on the CPU
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
        self.net = build_network(cfg, self.spec.num_classes)
        whitening = [m for m in self.net.modules() if isinstance(m, architectures.PatchWhitening)]
        if whitening and cfg.weights_source is None:  # fitted here; loaded with the weights
            photos = self.whitening_photos()
            for layer in whitening:
                layer.fit(photos)
        self.net = self.net.to(self.device)
        if self.amp:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.net, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.train_batches))
        self.total_steps = cfg.epochs * len(self.train_batches)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.cuda)
        self.ema = (
            AveragedModel(
                self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
            if cfg.ema_decay > 0
            else None
        )
        self.lookahead = (
            Lookahead(self.net, cfg.lookahead_every, cfg.lookahead_decay)
            if cfg.lookahead_every > 0
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
            "lookahead": self.lookahead.state_dict() if self.lookahead else None,
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
        if self.lookahead and state.get("lookahead") is not None:
            self.lookahead.load_state_dict(state["lookahead"])
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

    def whitening_photos(self) -> torch.Tensor:
        """Up to :data:`WHITENING_PHOTOS` training photos through the eval transform, which a
        seed_cnn ``whiten`` layer (the first layer: it sees them as they are) is fitted on."""
        count = min(WHITENING_PHOTOS, len(self.spec.train))
        batches = eval_batches(
            self.spec.train[:count], self.spec, self.cache, self.pre, count, workers=0
        )
        return next(batches())[0]

    def frozen(self, epoch: int) -> bool:
        """Fine-tuning starts with the head alone: a fresh head's large gradients would
        otherwise wreck the pretrained features before it has learned anything."""
        return self.cfg.fine_tuning and epoch < self.cfg.freeze_epochs

    def model_for(self, epoch: int) -> nn.Module:
        """The network in train mode for ``epoch`` (backbone frozen or not), DDP-wrapped in a
        torchrun job; the wrapper is rebuilt per epoch since freezing changes what it syncs."""
        frozen = self.frozen(epoch)
        self.net.train()
        backbone = {id(p) for p in self.net.features.parameters()}
        for p in self.trainable:
            p.requires_grad_(not (frozen and id(p) in backbone))
        whiten_bias = self.cfg.whiten_bias_epochs == 0 or epoch < self.cfg.whiten_bias_epochs
        for module in self.net.modules():
            if isinstance(module, architectures.PatchWhitening):
                module.bias.requires_grad_(whiten_bias and not frozen)
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
        dtype = evaluate.amp_dtype(self.device)
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
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
        if self.lookahead:
            self.lookahead.step(self.net, self.scheduler.last_epoch, self.total_steps)
        return loss.item(), float(hits(logits.detach(), targets, self.spec.task))

    # ---- validation --------------------------------------------------------------------------

    @property
    def eval_net(self) -> architectures.TaggerNet:
        return self.ema.module if self.ema else self.net

    def predict(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C) on the CPU, targets) of the validation photos, through the eval
        transform from the cache (when there is one). TTA is measured once, on the final
        checkpoint (:func:`model.training.report.finalize`)."""
        batches, net = self.val_batches(), self.eval_net
        return evaluate.predict(net, batches, self.device, amp=self.amp)

    def validate(self) -> dict[str, float]:
        logits, targets = self.predict()
        classes, task = self.spec.classes, self.spec.task
        row = {"val_loss": float(self.loss_fn(logits, targets))}
        result = evaluate.evaluate_predictions(logits, targets, classes, task)
        if task == "multi_label":
            return row | {"val_mAP": result["mAP"]}
        row["val_acc"] = result["accuracy"]
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
            "tta": cfg.served_tta.name,
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
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_mAP"):
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
