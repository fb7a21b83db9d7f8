"""Regions: the parts of a photo tagged beside the whole, so that several things get tags.

A classifier's softmax puts a photo's probability on its one most salient thing, so the whole
photo alone gives at most one confident tag. Each region is read like a photo of its own (the
same resize and crop), in the same batched forward pass, and the whole photo's and the likeliest
region's probabilities of a tag are merged (:func:`merge`, ``Tagger.tags``). The vocabulary's
thresholds are fitted for what is served this way (``bench/vocabulary_bench.py``);
bench/README.md measures the tags it adds and what it costs.
"""

from __future__ import annotations

import torch
from PIL import Image

CHOICES = (0, 4)  # the whole photo alone, or with its four corner regions
DEFAULT = 4
FRACTION = 0.6  # a region's side as a fraction of the photo's: neighbours overlap by a fifth


def check(count: int) -> int:
    if count not in CHOICES:
        raise ValueError(f"regions: {' or '.join(map(str, CHOICES))}, got {count}")
    return count


def crop(image: Image.Image, count: int) -> list[Image.Image]:
    """The ``count`` regions of a photo: its four corners, each ``FRACTION`` of its width and
    height (top left, top right, bottom left, bottom right)."""
    check(count)
    if not count:
        return []
    width, height = image.size
    w, h = max(1, round(width * FRACTION)), max(1, round(height * FRACTION))
    corners = [(0, 0), (width - w, 0), (0, height - h), (width - w, height - h)]
    return [image.crop((x, y, x + w, y + h)) for x, y in corners]


def merge(whole: torch.Tensor, regional: torch.Tensor) -> torch.Tensor:
    """A tag's probability as served, from the whole photo's (T,) and its regions' (R, T) (each
    in [0, 1]): as if the whole photo and the likeliest region were two witnesses, either of
    which may see it, ``1 - (1 - whole) * (1 - likeliest region)``. A tag both see is surer than
    on either alone; the largest of the two ranked such tags level with one a single view saw,
    and gave fewer right tags at the same precision (bench/README.md, "Tags")."""
    if not len(regional):
        return whole
    return 1 - (1 - whole) * (1 - regional.amax(0))
