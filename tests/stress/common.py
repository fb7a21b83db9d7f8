"""What the stress scripts share: checkpoints, the photo they send, a bounded wait, a report."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from model import architectures
from model.checkpoint import ModelCard, save
from model.preprocess import Preprocess
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint

PHOTO = photo_bytes((640, 480), noise=40)  # a small phone-like JPEG, decoded in draft mode


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"phototag-{prefix}-"))


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    return write_tiny_checkpoint(path, seed=seed)


def slow_checkpoint(path: Path) -> Path:
    """A seed_cnn big enough (~25 ms a photo on one CPU thread) that a burst fills the queue."""
    args = {"input_size": 160, "widths": [64, 128], "hidden": [32]}
    net = architectures.build("seed_cnn", len(TINY_CLASSES), **args)
    card = ModelCard(
        name="slow",
        arch="seed_cnn",
        arch_args=args,
        classes=TINY_CLASSES,
        preprocess=Preprocess(resize=176, crop=160),
    )
    return save(path, net, card)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def report(name: str, figures: dict) -> dict:
    print(f"[{name}] " + json.dumps(figures, default=str))
    return figures
