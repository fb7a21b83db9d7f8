"""Input preprocessing, described by the checkpoint and built in one place.

Training-time validation and ``model.evaluate`` call :func:`build_eval_transform` with the
checkpoint's :class:`Preprocess`; the server runs the same two stages it composes
(:func:`resize_and_crop` on its decode threads, :func:`normalize` once per batch), so what a model
saw while it was measured is exactly what it sees when it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` px, center-crop ``crop`` x ``crop``, scale to [0, 1],
    subtract ``mean`` and divide by ``std`` per RGB channel."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    # fields a later phototag may add, kept verbatim
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(
                f"need 1 <= crop <= resize, got crop={self.crop}, resize={self.resize}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std all positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        known = {
            k: data[k] for k in ("resize", "crop", "mean", "std", "interpolation") if k in data
        }
        return cls(
            **known, extra={k: v for k, v in data.items() if k not in known and k != "extra"}
        )


# Longest side kept, as a multiple of the shorter one, before the resize (see limit_aspect).
MAX_ASPECT = 4


def limit_aspect(image: Image.Image) -> Image.Image:
    """Center-crop the long side to at most MAX_ASPECT x the short side.

    Resizing the shorter side of a 30000x2 strip to 256 px would make a 3840000x256 image
    (gigabytes, seconds) from a PNG of a few hundred bytes. The center crop that follows the resize
    only ever keeps the middle short x short square (crop <= resize), so cutting the long side to
    4x the short one first keeps everything it and the resampling filter read: photos up to 4:1
    are untouched, longer ones give the same crop up to sub-pixel resampling."""
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= MAX_ASPECT * short:
        return image
    keep = MAX_ASPECT * short
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def resize_and_crop(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Geometry: PIL RGB image (any size) -> uint8 (3, crop, crop) pixels.

    Pillow and numpy only, no torch kernels: it runs on a server's decode threads, where torch's
    OpenMP intra-op threads would fight the inference thread for the cores (tiny float ops were
    measured 400x slower that way on two busy cores). Pillow's bilinear/bicubic resize filters
    over the whole source footprint when it shrinks (antialiased), like torchvision's
    ``Resize(antialias=True)``, with the same output size rule (shorter side -> ``resize``)."""
    image = limit_aspect(image)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(pre.resize * long / short)
    size = (pre.resize, new_long) if width <= height else (new_long, pre.resize)
    if size != image.size:
        image = image.resize(size, _PIL_FILTERS[pre.interpolation])
    left = round((size[0] - pre.crop) / 2.0)
    top = round((size[1] - pre.crop) / 2.0)
    image = image.crop((left, top, left + pre.crop, top + pre.crop))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) view


def normalize(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, in the same
    operations as torchvision's ``ToDtype(scale=True)`` + ``Normalize`` (bit for bit); one pass
    over a whole batch on the thread that runs the network."""
    mean = torch.tensor(pre.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(pre.std, device=pixels.device).view(3, 1, 1)
    return pixels.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def build_eval_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image (any size) -> normalised float tensor (3, crop, crop): the two stages
    :func:`resize_and_crop` and :func:`normalize` that a server runs on different threads."""

    def transform(image: Image.Image) -> torch.Tensor:
        return normalize(resize_and_crop(image, pre), pre)

    return transform
