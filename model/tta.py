"""Test-time augmentation: the views of a photo whose logits are averaged.

One home for what a TTA setting means, used by evaluation (``--tta-flip``/``--tta-shift``) and by
the server when a checkpoint's card asks for it (``tta``: ``flip`` or ``flip_shift``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

NAMES = ("none", "flip", "flip_shift")


@dataclass(frozen=True)
class TTA:
    """``flip``: the photo and its mirror image, half each. ``shift`` (with ``flip``): half of
    that pair, plus a quarter each for the pair shifted one pixel up-left and the pair shifted one
    pixel down-right (airbench's multi-crop; reflected edges): 6 forward passes."""

    flip: bool = False
    shift: bool = False

    def __post_init__(self) -> None:
        if self.shift and not self.flip:
            raise ValueError("adds views to --tta-flip (shifted views come with the flip views)")

    @classmethod
    def named(cls, name: str) -> TTA:
        if name not in NAMES:
            raise ValueError(f"TTA must be one of {', '.join(NAMES)}, got {name!r}")
        return cls(flip=name != "none", shift=name == "flip_shift")

    @property
    def name(self) -> str:
        return "flip_shift" if self.shift else "flip" if self.flip else "none"

    def views(self, images: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        """(weight, view) pairs of a (B, 3, H, W) batch; the photo itself comes first."""
        if not self.flip:
            return [(1.0, images)]
        if not self.shift:
            return _mirrored(0.5, images)
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        height, width = images.shape[-2:]
        return [
            *_mirrored(0.25, images),
            *_mirrored(0.125, padded[..., :height, :width]),
            *_mirrored(0.125, padded[..., 2:, 2:]),
        ]

    def logits(self, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor):
        """The weighted mean of ``model``'s float logits over the views."""
        return sum(weight * model(view).float() for weight, view in self.views(images))


def _mirrored(weight: float, images: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    return [(weight, images), (weight, images.flip(-1))]
