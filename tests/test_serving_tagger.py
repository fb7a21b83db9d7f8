"""The tagger's device settings: autocast dtype per setting and device, warm-up shapes."""

from __future__ import annotations

import pytest
import torch

from app.tagger import Tagger, resolve_autocast

CUDA = torch.device("cuda")


@pytest.mark.parametrize("setting", ["auto", "off", "fp16", "bf16"])
def test_the_cpu_never_autocasts(setting):
    assert resolve_autocast(setting, torch.device("cpu")) is None


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
    tagger = Tagger.from_file(str(tiny_checkpoint), "cuda", "fp16")
    tagger.warm_up((1, 4))
    probs = tagger.probabilities(torch.zeros(4, 3, 32, 32))
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-3)
