"""Regions: the parts of a photo tagged beside the whole, so that several things get tags.

A classifier's softmax puts a photo's probability on its one most salient thing, so the whole
photo alone gives at most one confident tag. Each region is read like a photo of its own (the
same resize and crop), in the same batched forward pass, and a tag is as probable as it is on
the whole photo or on its likeliest region (``Tagger.tags``). The vocabulary's thresholds are
fitted for what is served this way (``bench/vocabulary_bench.py``); bench/README.md measures the
tags it adds and what it costs.
"""

from __future__ import annotations

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
