"""The tagger's device settings: autocast dtype per setting and device, warm-up shapes."""

from __future__ import annotations

import pytest
import torch

from app import tagger as tagger_module
from app.tagger import Tagger, resolve_autocast

CUDA = torch.device("cuda")


CPU = torch.device("cpu")


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
    monkeypatch.setattr(tagger_module, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_autocast(setting, CPU) == expected


def test_cpu_bf16_probabilities_stay_within_0_02_of_float32(default_checkpoint):
    if not tagger_module.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 means float32 there")
    exact = Tagger.from_file(str(default_checkpoint), "cpu", "off", "torch")
    fast = Tagger.from_file(str(default_checkpoint), "cpu", "bf16", "torch")
    assert fast.amp_dtype == torch.bfloat16
    torch.manual_seed(0)
    batch = torch.randn(4, 3, 224, 224)
    difference = (fast.probabilities(batch) - exact.probabilities(batch)).abs().max()
    assert difference <= 0.02


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


def test_warm_up_runs_a_single_photo_and_a_full_batch(client_for, tiny_checkpoint, monkeypatch):
    sizes = []
    original = Tagger.probabilities
    monkeypatch.setattr(
        Tagger, "probabilities", lambda s, b: sizes.append(len(b)) or original(s, b)
    )
    client_for(tiny_checkpoint, max_batch_size=6)
    assert sizes == [1, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_model_is_channels_last_and_autocast(tiny_checkpoint):
    tagger = Tagger.from_file(str(tiny_checkpoint), "cuda", "fp16", "auto")
    tagger.warm_up((1, 4))
    probs = tagger.probabilities(torch.zeros(4, 3, 32, 32))
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-3)
