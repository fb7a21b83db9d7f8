"""The OpenVINO backend served end to end (the runtime itself: tests/model/test_runtime.py)."""

from __future__ import annotations

import pytest
import torch

from model.runtime import openvino_installed
from tests.app.test_api import direct_probabilities
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint

needs_openvino = pytest.mark.skipif(
    not openvino_installed(), reason="OpenVINO is not installed (pip install openvino)"
)


@needs_openvino
@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_served_probabilities_equal_a_direct_forward_pass(client_for, tmp_path, task):
    ckpt = write_tiny_checkpoint(tmp_path / "t.safetensors", seed=4, task=task, temperature=1.3)
    client = client_for(ckpt, backend="openvino")
    data = photo_bytes((90, 70), color=(30, 60, 200), seed=2)
    r = client.post("/v1/tags?all=true", files={"file": ("b.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    served = r.json()["results"][0]["probabilities"]
    assert list(served) == TINY_CLASSES
    expected = direct_probabilities(ckpt, data)
    assert torch.allclose(torch.tensor(list(served.values())), expected, atol=1e-5)
    info = client.get("/v1/model").json()
    assert (info["backend"], info["precision"]) == ("openvino", "float32")
