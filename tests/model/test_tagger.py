"""The photo -> tags pipeline without HTTP: what the server answers, in a few lines of Python."""

from __future__ import annotations

import pytest
import torch

from model.imageio import PhotoError
from tests.helpers import TINY_CLASSES, load_tagger, photo_bytes, write_tiny_checkpoint


def test_bytes_to_tags_in_a_few_lines_equal_the_servers_answer(client_for, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=3, temperature=1.4)
    photo = photo_bytes((90, 60), color=(40, 180, 60), seed=1)
    tagger = load_tagger(checkpoint)
    tags = tagger.tag(photo, top_k=3)
    served = client_for(checkpoint).post("/v1/tags?top_k=3", files={"file": ("p.jpg", photo)})
    expected = served.json()["results"][0]["tags"]
    assert [t.label for t in tags] == [t["label"] for t in expected]
    assert [t.probability for t in tags] == pytest.approx([t["probability"] for t in expected])


def test_tags_keep_the_top_k_above_the_threshold_or_the_cards_thresholds(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "t.safetensors"))
    probabilities = torch.tensor([0.2, 0.5, 0.3])
    assert [t.label for t in tagger.tags(probabilities, top_k=2)] == ["green", "blue"]
    assert [t.label for t in tagger.tags(probabilities, 3, threshold=0.25)] == ["green", "blue"]
    multi = write_tiny_checkpoint(
        tmp_path / "m.safetensors", task="multi_label", thresholds=[0.1, 0.9, 0.3]
    )
    tagger = load_tagger(multi)
    assert [t.label for t in tagger.tags(probabilities, top_k=3)] == ["blue", "red"]
    assert tagger.classes == TINY_CLASSES


def test_bytes_that_are_not_a_photo_raise_a_photo_error_with_its_code(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "t.safetensors"))
    with pytest.raises(PhotoError) as refused:
        tagger.tag(b"%PDF-1.7 not a photo")
    assert refused.value.code == "unsupported_media_type"
    with pytest.raises(PhotoError, match="the limit is 5000") as refused:
        tagger.pixels(photo_bytes((100, 100)), max_pixels=5000)
    assert refused.value.code == "image_too_large"
