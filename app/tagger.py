"""A loaded checkpoint on a device: preprocessing and probabilities for a batch of photos."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from PIL import Image

from model.checkpoint import Checkpoint, CheckpointError, ModelCard
from model.checkpoint import load as load_checkpoint
from model.inference import OpenVINONetwork, fold_batchnorm, openvino_installed
from model.preprocess import normalize, resize_and_crop

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Without it, bf16 is
    emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay with float32
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_autocast(setting: str, device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype for inference, or None for full float32.

    CUDA: ``auto`` is bf16 where the GPU has it, else fp16. CPU: ``auto`` is float32, which keeps
    probabilities equal to the training-time ones; ``bf16`` is bf16 on a CPU with native bf16
    (about twice as fast there, probabilities move by a few hundredths), float32 elsewhere;
    ``fp16`` means float32 (no fast fp16 on CPUs)."""
    if setting == "off":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if setting == "bf16" and cpu_has_native_bf16() else None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resolve_backend(setting: str, device: torch.device) -> str:
    """``auto`` -> ``openvino`` on a CPU where it is installed, else ``torch``; ``openvino`` must
    be installed and runs on the CPU only."""
    if setting == "torch" or (setting == "auto" and device.type != "cpu"):
        return "torch"
    if not openvino_installed():
        if setting == "auto":
            return "torch"
        raise CheckpointError(
            "PHOTOTAG_BACKEND=openvino but OpenVINO is not installed: pip install openvino"
        )
    if device.type != "cpu":
        raise CheckpointError(
            f"PHOTOTAG_BACKEND=openvino runs on the CPU, but PHOTOTAG_DEVICE is {device}: "
            "set PHOTOTAG_DEVICE=cpu or PHOTOTAG_BACKEND=torch"
        )
    return "openvino"


class Tagger:
    """The network of one checkpoint, ready to turn photos into per-class probabilities.

    Not thread-safe by itself: the batcher runs every forward pass on its one inference thread."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        autocast: str = "auto",
        backend: str = "auto",
        threads: int = 0,
    ) -> None:
        self.card: ModelCard = checkpoint.card
        self.version = checkpoint.version
        self.path = checkpoint.path
        self.device = device
        self.amp_dtype = resolve_autocast(autocast, device)
        # BatchNorm folded into the convs: the same outputs (to float rounding), less memory traffic
        self.model = fold_batchnorm(checkpoint.build_model(device))
        choice = resolve_backend(backend, device)
        self.openvino = self._compile_openvino(backend, threads) if choice == "openvino" else None
        # channels-last: cuDNN's and oneDNN's fast convolution layout (1.4x on a CPU here)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.ready = False

    @classmethod
    def from_file(
        cls,
        path: str,
        device_setting: str = "auto",
        autocast: str = "auto",
        backend: str = "auto",
        threads: int = 0,
    ) -> Tagger:
        device = resolve_device(device_setting)
        return cls(load_checkpoint(path), device, autocast, backend, threads)

    def _compile_openvino(self, setting: str, threads: int) -> OpenVINONetwork | None:
        """The network compiled by OpenVINO; None (torch serves it) where a layer cannot be
        converted and the backend is ``auto``, an error where it was asked for by name.

        ``threads`` 0 means all cores: unlike torch's OpenMP threads, OpenVINO's sleep when they
        wait, so they take the cores only while decoders leave them free (thumbnails: 88 -> 119
        photos/s on 2 cores; phone photos: the same)."""
        precision = "bf16" if self.amp_dtype == torch.bfloat16 else "f32"
        threads = threads or len(os.sched_getaffinity(0))
        try:
            return OpenVINONetwork(self.model, self.card.preprocess.crop, threads, precision)
        except Exception as exc:  # converters fail in many ways; torch still runs the network
            reason = f"{type(exc).__name__}: {str(exc)[:500]}"
            if setting == "openvino":
                raise CheckpointError(
                    f"OpenVINO could not compile this network ({reason}); "
                    "serve it with PHOTOTAG_BACKEND=torch"
                ) from exc
            log.warning("OpenVINO could not compile %s (%s); torch serves it", self.name, reason)
            return None

    @property
    def backend(self) -> str:
        return "torch" if self.openvino is None else "openvino"

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def precision(self) -> str:
        """float32, bfloat16 or float16: what the network computes in."""
        if self.openvino is not None:
            return "bfloat16" if self.openvino.precision == "bf16" else "float32"
        return str(self.amp_dtype or torch.float32).removeprefix("torch.")

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def draft_size(self, reducing_gap: float) -> int | None:
        """The JPEG draft target: both sides of a photo decoded at a reduced scale stay at least
        ``reducing_gap`` times the resize size (PHOTOTAG_JPEG_REDUCING_GAP); None (0) decodes
        in full."""
        return round(self.card.preprocess.resize * reducing_gap) or None

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> uint8 (3, crop, crop), resized and cropped as the checkpoint says;
        runs on a decode thread, beside the decoding (Pillow only: torch's threads stay with
        the network). :meth:`probabilities` normalises a batch of them."""
        return resize_and_crop(image, self.card.preprocess)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels (normalised here, on the device) or already normalised
        floats -> (B, num_classes) probabilities on the CPU: softmax of the temperature-scaled
        logits, or one sigmoid per tag for a multi-label model."""
        batch = batch.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = normalize(batch, self.card.preprocess)
        logits = self._logits(batch).float() / self.card.temperature
        if self.card.task == "multi_label":
            return torch.sigmoid(logits).cpu()
        return torch.softmax(logits, dim=1).cpu()

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.openvino is not None:
            return self.openvino(batch)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype)
        ):
            return self.model(batch)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Forward passes on blank batches (one per size: cuDNN picks its kernels per shape), so
        the first real requests pay no start-up cost."""
        crop = self.card.preprocess.crop
        for size in batch_sizes:
            self.probabilities(torch.zeros(size, 3, crop, crop, dtype=torch.uint8))
        self.ready = True
        log.info(
            "model %s version %s ready on %s (backend %s, %s)",
            self.name,
            self.version,
            self.device,
            self.backend,
            self.precision,
        )
