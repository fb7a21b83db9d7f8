"""Regions: the whole photo and its four corners in one forward pass; each tag's probability the
whole photo's merged with its likeliest region's; the whole photo's probabilities unchanged."""

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


def test_a_tag_merges_the_whole_photo_and_its_likeliest_region_the_whole_photo_unchanged(
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
    assert torch.allclose(served, 1 - (1 - views[0]) * (1 - views[1:].amax(0)))
    assert bool((served >= views.amax(0) - 1e-6).all())
    assert torch.equal(parts.tag_probabilities(alone), whole.tag_probabilities(alone))


def test_merging_two_views_that_both_see_a_tag_makes_it_surer_than_either():
    whole = torch.tensor([0.6, 0.0, 0.9, 1.0])
    regional = torch.tensor([[0.5, 0.0, 0.0, 0.2], [0.1, 0.7, 0.0, 0.0]])
    merged = regions.merge(whole, regional)
    assert torch.allclose(merged, torch.tensor([0.8, 0.7, 0.9, 1.0]))
    assert torch.equal(regions.merge(whole, torch.zeros(0, 4)), whole)


def test_the_whole_photo_alone_is_tagged_at_its_own_thresholds(tmp_path):
    """Probabilities merged with regions answer to each tag's threshold, the whole photo's alone
    (PHOTOTAG_REGIONS=0, or an explanation's top tag) to its whole_threshold."""
    import copy
    from dataclasses import replace

    tree = copy.deepcopy(TREE)
    tree["tags"][3].update(threshold=0.85, whole_threshold=0.6)  # blue
    checkpoint = write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=tree)
    tagger = load_tagger(checkpoint, regions=4)
    scores = tagger.outputs(tagger.prepare(photo_with_a_red_corner()).pixels[None]).unbind()[0]
    whole = torch.tensor([0.1, 0.2, 0.7])  # red, green, blue: cool 0.9, blue 0.7
    regional = torch.full((4, 3), 1 / 3)  # merged: cool 0.97, blue 0.8, warm 0.4
    merged = replace(scores, probabilities=whole, regions=regional)
    assert [t.label for t in tagger.tags(merged)] == ["cool"]
    assert [t.label for t in tagger.tags(replace(merged, regions=None))] == ["blue"]
    assert [t.label for t in tagger.tags(whole)] == ["blue"]
    assert [t.label for t in load_tagger(checkpoint).tags(whole)] == ["blue"]
