"""The runtime: device, backend and precision chosen in one place; every backend computes the
same logits and pooled features as the plain network."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from model import runtime
from model.architectures import build
from model.checkpoint import load
from model.runtime import (
    ConfigError,
    OpenVINORuntime,
    RuntimeChoice,
    RuntimeUnavailable,
    TorchRuntime,
    create_runtime,
    fold_batchnorm,
    openvino_installed,
    resolve_autocast,
    resolve_backend,
    resolve_device,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_openvino = pytest.mark.skipif(
    not openvino_installed(), reason="OpenVINO is not installed (pip install openvino)"
)


def randomise_batchnorm_statistics(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize(
    ("arch", "args", "size"),
    [
        ("efficientnet_lite0", {}, 64),
        ("seed_cnn", {"input_size": 32, "widths": [4, 8], "convs_per_block": 2,
                      "batch_norm": True}, 32),
        ("resnet18", {}, 64),
    ],
)  # fmt: skip
def test_folding_batchnorm_keeps_the_outputs(arch, args, size):
    torch.manual_seed(0)
    net = build(arch, 5, **args).eval()
    randomise_batchnorm_statistics(net)
    folded = fold_batchnorm(net)
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        assert torch.allclose(folded(x), net(x), atol=1e-4, rtol=1e-4)
    remaining = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    if arch != "resnet18":  # torchvision's ResNet keeps conv and bn as attributes, not in order
        assert remaining == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched


def test_devices_resolve_once_for_every_caller():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("cuda", "PHOTOTAG_DEVICE=cuda but CUDA is not available here"),
        ("cuda:1", "PHOTOTAG_DEVICE=cuda:1 but CUDA is not available here"),
        ("tpu", "PHOTOTAG_DEVICE=tpu: use auto, cpu, cuda or cuda:N"),
        ("gpu0", "PHOTOTAG_DEVICE=gpu0: use auto, cpu, cuda or cuda:N"),
    ],
)
def test_an_impossible_device_is_a_configuration_error_naming_the_setting(setting, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(setting, name="PHOTOTAG_DEVICE")


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
    monkeypatch.setattr(runtime, "openvino_installed", lambda: installed)
    assert resolve_backend(setting, device) == expected


@pytest.mark.parametrize(
    ("device", "installed", "message"),
    [
        (CPU, False, "PHOTOTAG_BACKEND=openvino but OpenVINO is not installed: pip install"),
        (CUDA, True, "PHOTOTAG_BACKEND=openvino runs on the CPU, but the device is cuda"),
    ],
)
def test_asking_for_openvino_where_it_cannot_run_is_refused(monkeypatch, device, installed,
                                                            message):  # fmt: skip
    monkeypatch.setattr(runtime, "openvino_installed", lambda: installed)
    with pytest.raises(ConfigError, match=message):
        resolve_backend("openvino", device, "PHOTOTAG_BACKEND")


@pytest.mark.parametrize(
    ("setting", "native_bf16", "expected"),
    [
        ("auto", True, None),
        ("bf16", True, torch.bfloat16),
        ("auto", False, None),
        ("bf16", False, None),
        ("fp16", True, None),
        ("off", True, None),
    ],
)
def test_cpu_uses_bf16_only_when_asked_and_native(monkeypatch, setting, native_bf16,
                                                  expected):  # fmt: skip
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_autocast(setting, CPU) == expected


@pytest.mark.parametrize(
    ("setting", "bf16_supported", "expected"),
    [
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float16),
        ("fp16", True, torch.float16),
        ("bf16", False, torch.bfloat16),
        ("off", True, None),
    ],
)
def test_cuda_autocast_follows_the_setting(monkeypatch, setting, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_autocast(setting, CUDA) == expected


def test_threads_default_to_a_quarter_of_the_cores_for_torch_and_all_for_openvino(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: set(range(8)))
    choice = RuntimeChoice.resolve("cpu", "torch", "off", 0)
    assert (choice.torch_threads, choice.openvino_threads) == (2, 8)
    assert RuntimeChoice.resolve("cpu", "torch", "off", 3).torch_threads == 3


def plain_outputs(net: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Logits, pooled features and mid-level features, from the unfolded network."""
    with torch.inference_mode():
        features = net.features(batch)
        mid = net.features[1][:-1](net.features[0](batch)).mean((2, 3))
        return net.head(features), features, mid


def cpu_choice(backend: str) -> RuntimeChoice:
    return RuntimeChoice.resolve("cpu", backend, "off", 1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("openvino", marks=needs_openvino)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_backend_returns_the_logits_and_pooled_features(default_checkpoint, backend,
                                                              batch_size):  # fmt: skip
    net = load(default_checkpoint).build_model()
    served = create_runtime(net, 224, cpu_choice(backend))
    assert served.backend == backend and served.precision == "float32"
    torch.manual_seed(batch_size)
    batch = torch.randn(batch_size, 3, 224, 224)
    outputs = served.run(batch)
    assert outputs.logits.shape == (batch_size, 1000)
    assert outputs.features.shape == (batch_size, 1280) and outputs.mid.shape == (batch_size, 192)
    for got, expected in zip(outputs, plain_outputs(net, batch), strict=True):
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


@needs_openvino
def test_openvino_output_buffers_are_not_shared_between_calls(tiny_checkpoint):
    served = OpenVINORuntime(load(tiny_checkpoint).build_model(), 32, cpu_choice("openvino"))
    first = served.run(torch.zeros(2, 3, 32, 32))
    kept = [t.clone() for t in first]
    served.run(torch.ones(2, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(first, kept, strict=True))


@needs_openvino
def test_auto_falls_back_to_torch_when_the_network_does_not_convert(
    monkeypatch, tiny_checkpoint, caplog
):
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(runtime, "OpenVINORuntime", refuse)
    net = load(tiny_checkpoint).build_model()
    with caplog.at_level(logging.WARNING, logger="phototag.runtime"):
        served = create_runtime(net, 32, cpu_choice("auto"))
    assert isinstance(served, TorchRuntime)
    assert "OpenVINO could not compile the classifier (RuntimeError: unsupported" in caplog.text
    assert served.run(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 3)
    with pytest.raises(RuntimeUnavailable, match="serve it with the torch backend"):
        create_runtime(net, 32, cpu_choice("openvino"))


def test_cpu_bf16_probabilities_stay_within_0_02_of_float32(default_checkpoint):
    if not runtime.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 means float32 there")
    net = load(default_checkpoint).build_model()
    exact = create_runtime(net, 224, RuntimeChoice.resolve("cpu", "torch", "off", 1))
    fast = create_runtime(net, 224, RuntimeChoice.resolve("cpu", "torch", "bf16", 1))
    assert fast.precision == "bfloat16"
    torch.manual_seed(0)
    batch = torch.randn(4, 3, 224, 224)
    difference = (exact.run(batch).logits.softmax(1) - fast.run(batch).logits.softmax(1)).abs()
    assert difference.max() <= 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_network_is_channels_last_and_autocast(tiny_checkpoint):
    net = load(tiny_checkpoint).build_model()
    served = create_runtime(net, 32, RuntimeChoice.resolve("cuda", "auto", "fp16"))
    assert served.backend == "torch" and served.precision == "float16"
    batch = torch.randn(4, 3, 32, 32, device="cuda")
    logits = served.run(batch).logits
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    expected, *_ = plain_outputs(net.cuda(), batch)
    assert torch.allclose(logits, expected, atol=2e-2)
