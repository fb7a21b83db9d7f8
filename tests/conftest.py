"""Shared fixtures: tiny photos made with Pillow and tiny checkpoints written with the real save().

No binaries live in git: every photo and checkpoint a test needs is made here, in ``tmp_path``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
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


@pytest.fixture
def make_photo() -> Callable[..., bytes]:
    return photo_bytes


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


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny.safetensors")


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ImageNet EfficientNet-Lite0 checkpoint, built once per test session."""
    from model.pretrained import build_default_checkpoint

    return build_default_checkpoint(tmp_path_factory.mktemp("default") / "default.safetensors")


@pytest.fixture
def client_for() -> Iterator[Callable[..., TestClient]]:
    """``client_for(checkpoint, **settings)``: a TestClient with the lifespan run (model loaded)."""
    clients: list[TestClient] = []

    def make(checkpoint: Path, **overrides: object) -> TestClient:
        overrides.setdefault("autocast", "off")  # exact float32: tests compare probabilities
        # torch runs tiny test networks at once; OpenVINO (compiling ~0.6 s per model) has its
        # own tests (test_serving_openvino.py)
        overrides.setdefault("backend", "torch")
        settings = Settings(checkpoint=checkpoint, device="cpu", **overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_for: Callable[..., TestClient], tiny_checkpoint: Path) -> TestClient:
    return client_for(tiny_checkpoint)


def shared_data(name: str) -> Path:
    """A folder of ``../shared/data``, or skip the test with a clear message where it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(
            f"needs the real photo set {path} (../shared/data beside the repo), absent here"
        )
    return path
