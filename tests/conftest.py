"""Shared fixtures. The builders they use (tiny photos, photo folders, checkpoints) are in
``tests/helpers.py``, where tests import them from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import photo_bytes, write_tiny_checkpoint


@pytest.fixture
def make_photo() -> Callable[..., bytes]:
    return photo_bytes


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
        # own tests (tests/app/test_serving_openvino.py)
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
