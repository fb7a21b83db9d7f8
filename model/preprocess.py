"""Preprocessing, described by the checkpoint and written once: resize, crop, normalize, and
the interpolation table, for every path that feeds a network.

The server runs :func:`resize_and_crop` on its decode threads and :func:`normalize` once per
batch; the training cache keeps photos after :func:`resize` (so its crop is exact), validation,
the temperature fit and the evaluate CLI run :func:`build_eval_transform`, and training
augmentation ends in :func:`normalize`. So what a model saw while it was measured is, pixel for
pixel, what it sees when it serves.
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


@dataclass(frozen=True)
class Interpolation:
    """One resize filter under its two names: Pillow's (every resize to the working size) and
    torchvision's (training augmentation that resizes, such as RandomResizedCrop)."""

    pil: Image.Resampling
    torchvision: InterpolationMode


INTERPOLATIONS = {
    "bilinear": Interpolation(Image.Resampling.BILINEAR, InterpolationMode.BILINEAR),
    "bicubic": Interpolation(Image.Resampling.BICUBIC, InterpolationMode.BICUBIC),
    "nearest": Interpolation(Image.Resampling.NEAREST, InterpolationMode.NEAREST),
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


def resize(image: Image.Image, pre: Preprocess) -> Image.Image:
    """Any RGB image -> its shorter side at ``pre.resize`` px (the long side cut first to
    MAX_ASPECT x the short one, see :func:`limit_aspect`): the working size.

    Pillow's bilinear/bicubic filters cover the whole source footprint when they shrink
    (antialiased), like torchvision's ``Resize(antialias=True)``, with the same size rule."""
    image = limit_aspect(image)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(pre.resize * long / short)
    size = (pre.resize, new_long) if width <= height else (new_long, pre.resize)
    if size == image.size:
        return image
    return image.resize(size, INTERPOLATIONS[pre.interpolation].pil)


def center_crop(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """An image at the working size -> its middle ``crop`` x ``crop`` as uint8 (3, crop, crop)."""
    left = round((image.width - pre.crop) / 2.0)
    top = round((image.height - pre.crop) / 2.0)
    image = image.crop((left, top, left + pre.crop, top + pre.crop))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) view


def resize_and_crop(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Geometry: PIL RGB image (any size) -> uint8 (3, crop, crop) pixels.

    Pillow and numpy only, no torch kernels: it runs on a server's decode threads, where torch's
    OpenMP intra-op threads would fight the inference thread for the cores. A photo already at
    the working size (the training cache's) is only cropped."""
    return center_crop(resize(image, pre), pre)


def crop_box(size: tuple[int, int], pre: Preprocess) -> tuple[float, float, float, float]:
    """The part of an image of ``size`` (width, height) that :func:`resize_and_crop` keeps, as
    (left, top, right, bottom) in that image's pixels: the same steps (aspect limit, resize,
    center crop) applied to the coordinates, so a map over the crop (an explanation's heatmap)
    lands where the network looked."""
    width, height = size
    short = min(width, height)
    kept_w, kept_h = min(width, MAX_ASPECT * short), min(height, MAX_ASPECT * short)
    left0, top0 = (width - kept_w) // 2, (height - kept_h) // 2  # limit_aspect's crop
    long = max(kept_w, kept_h)
    new_long = int(pre.resize * long / short)
    resized = (pre.resize, new_long) if kept_w <= kept_h else (new_long, pre.resize)
    scale_x, scale_y = kept_w / resized[0], kept_h / resized[1]
    left = round((resized[0] - pre.crop) / 2.0)
    top = round((resized[1] - pre.crop) / 2.0)
    return (
        left0 + left * scale_x,
        top0 + top * scale_y,
        left0 + (left + pre.crop) * scale_x,
        top0 + (top + pre.crop) * scale_y,
    )


def normalize(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (or uint8-valued) (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` per channel,
    in the same operations as torchvision's ``ToDtype(scale=True)`` + ``Normalize`` (bit for
    bit). The server runs it once per batch on the inference thread, training at the end of
    augmentation, evaluation in :func:`build_eval_transform`."""
    mean = torch.tensor(pre.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(pre.std, device=pixels.device).view(3, 1, 1)
    return pixels.to(torch.float32, copy=True).mul_(1.0 / 255).sub_(mean).div_(std)


def build_eval_transform(pre: Preprocess) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """PIL RGB image (any size), or a uint8 (3, H, W) tensor at the working size (the training
    cache's) -> normalised float (3, crop, crop): the two stages :func:`resize_and_crop` and
    :func:`normalize` that a server runs on different threads."""

    def transform(image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())  # lossless: uint8 RGB
        return normalize(resize_and_crop(image, pre), pre)

    return transform
