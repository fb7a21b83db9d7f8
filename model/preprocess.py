"""Input preprocessing, described by the checkpoint and built in one place.

Training-time validation, ``model.evaluate`` and the server all call :func:`build_eval_transform`
with the checkpoint's :class:`Preprocess`, so what a model saw while it was measured is exactly what
it sees when it serves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

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


def build_eval_transform(pre: Preprocess) -> T.Compose:
    """PIL RGB image (any size) -> normalised float tensor (3, crop, crop)."""
    return T.Compose(
        [
            limit_aspect,  # bounded memory for extreme strips, before anything is allocated
            T.PILToTensor(),  # (3, H, W) uint8
            T.Resize(pre.resize, interpolation=INTERPOLATIONS[pre.interpolation], antialias=True),
            T.CenterCrop(pre.crop),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def to_batch(images: list[Image.Image], pre: Preprocess) -> torch.Tensor:
    """Several PIL images -> one (B, 3, crop, crop) batch."""
    transform = build_eval_transform(pre)
    return torch.stack([transform(image) for image in images])
