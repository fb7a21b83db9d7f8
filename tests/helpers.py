"""Shared test builders: tiny photos, photo folders and checkpoints made with the real code.

No binaries live in git: every photo and checkpoint a test needs is made here, in ``tmp_path``.
Fixtures that use these live in ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from model import architectures
from model.checkpoint import ModelCard, save
from model.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_CLASSES = ["red", "green", "blue"]
TINY_PREPROCESS = Preprocess(resize=36, crop=32)
TINY_ARCH_ARGS = {"input_size": 32, "widths": [4, 8], "hidden": [16], "dropout": 0.1}


def photo_bytes(
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (200, 30, 30),
    fmt: str = "JPEG",
    mode: str = "RGB",
    noise: int = 20,
    seed: int = 0,
    **save_args: object,
) -> bytes:
    """An encoded photo: a flat colour plus a little noise, in any Pillow format and mode."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(
        np.array(color, dtype=np.int16) + rng.integers(-noise, noise + 1, (size[1], size[0], 3)),
        0,
        255,
    ).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def write_tiny_checkpoint(
    path: Path, *, seed: int = 0, name: str = "tiny", task: str = "single_label", **card: object
) -> Path:
    """A real, small seed_cnn checkpoint (random weights) written with the real save()."""
    import torch

    torch.manual_seed(seed)
    net = architectures.build("seed_cnn", len(TINY_CLASSES), **TINY_ARCH_ARGS)
    fields = {
        "name": name,
        "arch": "seed_cnn",
        "arch_args": TINY_ARCH_ARGS,
        "classes": TINY_CLASSES,
        "task": task,
        "preprocess": TINY_PREPROCESS,
    }
    fields.update(card)
    return save(path, net, ModelCard(**fields))


def write_lite_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A random EfficientNet-Lite0 at 64 px, with the tiny classes: a network whose pooled
    features the custom tags read (seed_cnn's they do not)."""
    import torch

    torch.manual_seed(seed)
    net = architectures.build("efficientnet_lite0", len(TINY_CLASSES))
    card = ModelCard(
        name="lite",
        arch="efficientnet_lite0",
        classes=TINY_CLASSES,
        task="single_label",
        preprocess=Preprocess(resize=72, crop=64),
    )
    return save(path, net, card)


COLORS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def write_photo_folder(
    root: Path,
    per_class: int = 10,
    classes: dict[str, tuple[int, int, int]] = COLORS,
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Path:
    """A class-folder photo set: ``root/<class>/NN.jpg``, a noisy flat colour per class. Without
    ``size`` the photos' widths vary (40 + i) so no two are the same size."""
    for name, color in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photo_bytes(size or (40 + i, 36), color, seed=seed + i)
            (root / name / f"{i:02d}.jpg").write_bytes(photo)
    return root


def shared_data(name: str) -> Path:
    """A folder of ``../shared/data``, or skip the test with a clear message where it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(
            f"needs the real photo set {path} (../shared/data beside the repo), absent here"
        )
    return path


def face_photos() -> dict[str, list[Path]]:
    """Real photos of one person on different days (tools/face_photos.py), or skip the test with
    a clear message where they have not been fetched."""
    people = tool("face_photos").photos()
    if people is None:
        why = "needs the face photos: run `python tools/face_photos.py` (make test does)"
        if os.environ.get("PHOTOTAG_REQUIRE_FACE_PHOTOS") == "1":  # CI (.ci/run)
            pytest.fail(why)
        pytest.skip(why)
    return people


def tool(name: str) -> ModuleType:
    """A script of tools/ (``convert_yunet_weights``, ...) as a module: tools/ is no package."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tagger(
    path: Path,
    device: str = "cpu",
    autocast: str = "off",
    backend: str = "torch",
    regions: int = 0,
):
    """A :class:`model.tagger.Tagger` on the runtime these settings resolve to; the whole photo
    alone unless ``regions`` (tests of regions ask for them)."""
    from model.runtime import RuntimeChoice
    from model.tagger import Tagger

    return Tagger.load(path, RuntimeChoice.resolve(device, backend, autocast), regions=regions)


def queue_depth(metrics_text: str) -> float:
    """``phototag_queue_depth`` from a ``GET /metrics`` answer: photos waiting for inference."""
    for line in metrics_text.splitlines():
        if line.startswith("phototag_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no phototag_queue_depth in the metrics")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds: for states another process or thread reaches."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.01)


def cli_help(module: str) -> str:
    """``python -m MODULE --help``'s text, from this checkout (to check that flags exist)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout
