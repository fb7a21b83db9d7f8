"""The OpenVINO backend: chosen where it should be, the same logits as torch, served end to end."""

from __future__ import annotations

import logging

import pytest
import torch

from app import tagger as tagger_module
from app.tagger import Tagger, resolve_backend
from model.checkpoint import CheckpointError, load
from model.inference import OpenVINONetwork, fold_batchnorm, openvino_installed
from tests.app.test_api import direct_probabilities
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

needs_openvino = pytest.mark.skipif(
    not openvino_installed(), reason="OpenVINO is not installed (pip install openvino)"
)


@pytest.mark.parametrize(
    ("setting", "device", "installed", "expected"),
    [
        ("auto", CPU, True, "openvino"),
        ("auto", CPU, False, "torch"),
        ("auto", CUDA, True, "torch"),
        ("torch", CPU, True, "torch"),
        ("openvino", CPU, True, "openvino"),
    ],
)
def test_backend_choice(monkeypatch, setting, device, installed, expected):
    monkeypatch.setattr(tagger_module, "openvino_installed", lambda: installed)
    assert resolve_backend(setting, device) == expected


@pytest.mark.parametrize(
    ("device", "installed", "message"),
    [
        (CPU, False, "OpenVINO is not installed: pip install openvino"),
        (CUDA, True, "runs on the CPU, but PHOTOTAG_DEVICE is cuda"),
    ],
)
def test_asking_for_openvino_where_it_cannot_run_is_refused(monkeypatch, device, installed,
                                                            message):  # fmt: skip
    monkeypatch.setattr(tagger_module, "openvino_installed", lambda: installed)
    with pytest.raises(CheckpointError, match=message):
        resolve_backend("openvino", device)


@needs_openvino
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_default_network_logits_equal_torch_float32(default_checkpoint, batch_size):
    net = fold_batchnorm(load(default_checkpoint).build_model())
    compiled = OpenVINONetwork(net, crop=224, threads=1)
    torch.manual_seed(batch_size)
    batch = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        expected = net(batch)
    logits = compiled(batch)
    assert logits.shape == (batch_size, 1000) and logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-5)


@needs_openvino
def test_output_buffer_is_not_shared_between_calls(tiny_checkpoint):
    compiled = OpenVINONetwork(load(tiny_checkpoint).build_model(), crop=32, threads=1)
    first = compiled(torch.zeros(2, 3, 32, 32))
    kept = first.clone()
    compiled(torch.ones(2, 3, 32, 32))
    assert torch.equal(first, kept)


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


@needs_openvino
def test_auto_falls_back_to_torch_when_the_network_does_not_convert(
    monkeypatch, tiny_checkpoint, caplog
):
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(tagger_module, "OpenVINONetwork", refuse)
    with caplog.at_level(logging.WARNING, logger="phototag.tagger"):
        tagger = Tagger.from_file(str(tiny_checkpoint), "cpu", "off", "auto")
    assert tagger.backend == "torch"
    assert "OpenVINO could not compile tiny (RuntimeError: unsupported operation)" in caplog.text
    assert tagger.probabilities(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 3)
    with pytest.raises(CheckpointError, match="serve it with PHOTOTAG_BACKEND=torch"):
        Tagger.from_file(str(tiny_checkpoint), "cpu", "off", "openvino")
