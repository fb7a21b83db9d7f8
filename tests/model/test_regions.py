"""Regions: the whole photo and its four corners in one forward pass; each tag as probable as on
the whole photo or its likeliest region; the whole photo's probabilities unchanged."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from model import regions
from tests.helpers import load_tagger, write_tiny_checkpoint
from tests.model.test_vocabulary import TREE


def test_the_four_regions_are_the_corners_at_sixty_percent():
    photo = Image.new("RGB", (100, 50))
    parts = regions.crop(photo, 4)
    assert [p.size for p in parts] == [(60, 30)] * 4
    assert regions.crop(photo, 0) == []
    with pytest.raises(ValueError, match="regions"):
        regions.check(3)


def photo_with_a_red_corner() -> bytes:
    image = Image.new("RGB", (400, 300), (20, 200, 20))
    image.paste((230, 20, 20), (0, 0, 200, 150))  # the top-left quarter
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_tag_is_as_probable_as_on_its_likeliest_view_and_the_whole_photo_is_unchanged(
    tmp_path,
):
    checkpoint = write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE)
    whole, parts = load_tagger(checkpoint), load_tagger(checkpoint, regions=4)
    data = photo_with_a_red_corner()
    prepared = parts.prepare(data)
    assert prepared.pixels.shape[0] == 5  # the whole photo, then its four corners
    assert torch.equal(prepared.pixels[0], whole.prepare(data).pixels)
    scores = parts.outputs(prepared.pixels[None]).unbind()[0]
    alone = whole.outputs(whole.prepare(data).pixels[None]).unbind()[0]
    assert torch.allclose(scores.probabilities, alone.probabilities, atol=1e-6)
    assert scores.regions.shape == (4, len(parts.classes))
    served = parts.tag_probabilities(scores)
    views = parts.vocabulary.roll_up(
        torch.cat([scores.probabilities[None], scores.regions]), "single_label"
    )
    assert torch.allclose(served, views.amax(0))
    assert bool((served >= parts.tag_probabilities(alone) - 1e-6).all())
