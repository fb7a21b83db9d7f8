"""A loaded checkpoint on a device: preprocessing and probabilities for a batch of photos."""

from __future__ import annotations

import logging
import threading

import torch
from PIL import Image

from model.checkpoint import Checkpoint, CheckpointError, ModelCard
from model.checkpoint import load as load_checkpoint
from model.preprocess import build_eval_transform

log = logging.getLogger("phototag.tagger")


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> the first GPU when CUDA works, else the CPU; ``cuda``/``cuda:N`` must exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"PHOTOTAG_DEVICE={setting} but CUDA is not available here")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise CheckpointError(
                f"PHOTOTAG_DEVICE={setting} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device


class Tagger:
    """The network of one checkpoint, ready to turn photos into per-class probabilities."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device):
        self.card: ModelCard = checkpoint.card
        self.version = checkpoint.version
        self.path = checkpoint.path
        self.device = device
        self.model = checkpoint.build_model(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.transform = build_eval_transform(self.card.preprocess)
        self.ready = False
        self._lock = threading.Lock()  # one forward pass at a time: each already uses every core

    @classmethod
    def from_file(cls, path: str, device_setting: str = "auto") -> Tagger:
        return cls(load_checkpoint(path), resolve_device(device_setting))

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def draft_size(self) -> int:
        """The smallest side a decoded photo needs before the resize (JPEG draft target)."""
        return self.card.preprocess.resize

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> normalised (B, 3, crop, crop) float batch, as the checkpoint says."""
        return torch.stack([self.transform(image) for image in images])

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) probabilities on the CPU: softmax of the
        temperature-scaled logits, or one sigmoid per tag for a multi-label model."""
        batch = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._lock:
            logits = self.model(batch).float()
        logits = logits / self.card.temperature
        if self.card.task == "multi_label":
            return torch.sigmoid(logits).cpu()
        return torch.softmax(logits, dim=1).cpu()

    def tag(self, images: list[Image.Image]) -> torch.Tensor:
        return self.probabilities(self.preprocess(images))

    def warm_up(self) -> None:
        """One forward pass on a blank batch, so the first real request pays no start-up cost."""
        crop = self.card.preprocess.crop
        self.probabilities(torch.zeros(1, 3, crop, crop))
        self.ready = True
        log.info("model %s version %s ready on %s", self.name, self.version, self.device)
