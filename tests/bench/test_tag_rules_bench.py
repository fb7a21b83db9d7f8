"""bench/tag_rules_bench.py's rules and views, and the cross-validation it shares with
bench/vocabulary_bench.py, on made-up probabilities (the photo sets are the benchmark's)."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from model import regions
from model import vocabulary as vocab
from model.preprocess import Preprocess
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import tag_rules_bench as rules
import vocabulary_bench


def identity(p: torch.Tensor) -> torch.Tensor:
    return p


def views(seed: int = 0, classes: int = 6) -> torch.Tensor:
    """(11, classes) one photo's made-up probabilities per view."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(11, classes, generator=generator), dim=1)


def test_served_is_the_servers_merge_of_the_whole_photo_and_its_regions():
    p = views()
    expected = regions.merge(p[0], p[1:5])
    assert torch.allclose(rules.served(p, identity), expected)


def test_mirror_images_that_agree_change_nothing_and_ones_that_differ_are_averaged():
    p = views()
    p[rules.MIRRORED_WHOLE] = p[rules.WHOLE]
    p[rules.MIRRORED_REGIONS] = p[rules.REGIONS]
    assert torch.allclose(rules.mirrored(p, identity), rules.served(p, identity))
    p[rules.MIRRORED_WHOLE] = torch.zeros(6)
    half = regions.merge(p[rules.WHOLE] / 2, p[rules.REGIONS])
    assert torch.allclose(rules.mirrored(p, identity), half)
    assert torch.allclose(rules.mirrored_whole(p, identity), half)


def test_the_tail_cut_leaves_out_only_classes_under_its_floor():
    p = torch.tensor([[0.9, 0.004, 0.096]] * 11)
    cut = rules.tail_cut(p, identity)
    assert cut[1] == 0 and cut[0] == pytest.approx(1 - 0.1 * 0.1)


def test_the_squeezed_view_keeps_the_whole_photo_and_its_pixels_in_place():
    image = Image.new("RGB", (400, 100), (10, 20, 30))
    image.paste((250, 0, 0), (0, 0, 100, 100))  # the left quarter, which a centre crop drops
    pixels = rules.squeeze(image, Preprocess(resize=64, crop=48))
    assert pixels.shape == (3, 48, 48) and pixels.dtype == torch.uint8
    assert pixels[:, 24, 2].tolist() == [250, 0, 0]
    assert pixels[:, 24, 40].tolist() == [10, 20, 30]


class StubTagger:
    """What views() reads of a tagger: its served views (each filled with its index) and its
    preprocessing."""

    card = SimpleNamespace(preprocess=Preprocess(resize=8, crop=8))

    @staticmethod
    def views(image: Image.Image) -> torch.Tensor:
        served = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 8, 8).clone()
        served[:, :, :, 0] = 100  # a left edge, which the mirror images have on the right
        return served


def test_the_views_are_the_served_ones_then_their_mirror_images_then_the_squeezed_photo():
    image = Image.new("RGB", (16, 8), (7, 7, 7))
    got = rules.views(StubTagger(), image)  # type: ignore[arg-type]
    assert got.shape == (11, 3, 8, 8)
    assert [int(got[i, 0, 0, 4]) for i in range(10)] == [0, 1, 2, 3, 4] * 2
    served, mirrored = (
        got[rules.WHOLE : rules.MIRRORED_WHOLE],
        got[rules.MIRRORED_WHOLE : rules.SQUEEZED],
    )
    assert (served[:, :, :, 0] == 100).all() and (mirrored[:, :, :, -1] == 100).all()
    assert torch.equal(mirrored, served.flip(-1))
    assert (got[rules.SQUEEZED] == 7).all()


def test_three_witnesses_add_the_squeezed_photo_to_what_is_served():
    p = views()
    p[rules.SQUEEZED] = 0
    assert torch.allclose(rules.three_witnesses(p, identity), rules.served(p, identity))
    p[rules.SQUEEZED] = 1
    assert torch.allclose(rules.three_witnesses(p, identity), torch.ones(6))


def test_cross_validation_gives_every_photo_a_verdict_per_halving():
    from torchvision.models import ResNet18_Weights

    v = vocab.Vocabulary.from_dict(
        vocab.shipped(), ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    )
    generator = torch.Generator().manual_seed(0)
    photos, tags = 40, len(v.tags)
    rolled = torch.rand(photos, tags, generator=generator)
    right = rolled > 0.8  # the likeliest tags are the right ones: the fit finds thresholds
    args = argparse.Namespace(
        splits=2, precision=0.9, category_precision=0.92, floor=0.3, minimum=3
    )
    found = vocabulary_bench.cross_validate(v, {"coco-dev": (rolled, right)}, args)
    assert len(found["coco-dev"]) == photos * args.splits
    summary = vocabulary_bench.cv_summary(found["coco-dev"])
    assert summary["precision"] == 1.0 and summary["right_per_photo"] > 0
