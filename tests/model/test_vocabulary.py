"""The vocabulary: classes roll up into the tags people see, in a tree, with thresholds."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import CheckpointError, load
from model.tagger import Tagger
from model.vocabulary import Vocabulary, VocabularyError, fit_threshold
from tests.helpers import TINY_CLASSES, load_tagger, shared_data, write_tiny_checkpoint

# red, green, blue -> colour/warm (red), colour/cool (green) and colour/cool/blue (blue)
TREE = {
    "name": "colours",
    "tags": [
        {"label": "colour", "path": ["colour"], "threshold": 0.9, "classes": []},
        {"label": "warm", "path": ["colour", "warm"], "threshold": 0.5, "classes": ["red"]},
        {"label": "cool", "path": ["colour", "cool"], "threshold": 0.6, "classes": ["green"]},
        {"label": "blue", "path": ["colour", "cool", "blue"], "threshold": 0.5,
         "classes": ["blue"]},
    ],
    "hidden": [],
}  # fmt: skip


def vocabulary() -> Vocabulary:
    return Vocabulary.from_dict(TREE, TINY_CLASSES)


def labels(scored) -> list[str]:
    return [s.label for s in scored]


def test_single_label_probabilities_roll_up_as_exact_sums():
    probabilities = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), 1)
    rolled = vocabulary().roll_up(probabilities, "single_label")  # (4, 4 tags)
    red, green, blue = probabilities.unbind(1)
    assert torch.allclose(rolled[:, 0], red + green + blue, atol=1e-6)  # colour: everything
    assert torch.allclose(rolled[:, 1], red, atol=1e-7)
    assert torch.allclose(rolled[:, 2], green + blue, atol=1e-6)  # cool gathers blue too
    assert torch.allclose(rolled[:, 3], blue, atol=1e-7)


def test_multi_label_probabilities_roll_up_as_the_likeliest_class():
    probabilities = torch.tensor([0.2, 0.7, 0.4])
    rolled = vocabulary().roll_up(probabilities, "multi_label")
    assert rolled.tolist() == pytest.approx([0.7, 0.2, 0.7, 0.4])


def test_a_photo_gets_its_most_specific_confident_tags():
    v = vocabulary()
    # colour 1.0 and cool 0.8 are confident, blue 0.7 too: blue alone (its parents are implied)
    assert labels(v.select(torch.tensor([1.0, 0.2, 0.8, 0.7]), top_k=5)) == ["blue"]
    # blue unsure (0.3 < 0.5), cool sure: cool
    assert labels(v.select(torch.tensor([1.0, 0.2, 0.8, 0.3]), top_k=5)) == ["cool"]
    # nothing under colour is sure: colour, if it is (0.95 >= 0.9)
    assert labels(v.select(torch.tensor([0.95, 0.45, 0.5, 0.3]), top_k=5)) == ["colour"]
    # nothing sure at all: no tags, never junk
    assert v.select(torch.tensor([0.85, 0.45, 0.4, 0.3]), top_k=5) == []
    # two branches sure (warm 0.55, and blue 0.5 under cool): both, most probable first
    both = torch.tensor([1.0, 0.55, 0.6, 0.5])
    assert labels(v.select(both, top_k=5)) == ["warm", "blue"]
    assert len(v.select(both, top_k=1)) == 1


def test_an_explicit_threshold_replaces_every_tags_own():
    v = vocabulary()
    rolled = torch.tensor([1.0, 0.3, 0.7, 0.4])
    assert labels(v.select(rolled, 5, threshold=0.35)) == ["blue"]
    assert labels(v.select(rolled, 5, threshold=0.0)) == ["blue", "warm"]  # the leaves


def test_the_whole_photo_alone_answers_to_its_own_thresholds_where_it_has_them():
    import copy

    from model.vocabulary import apply_thresholds

    data = copy.deepcopy(TREE)
    data["tags"][3]["whole_threshold"] = 0.25  # blue, read on the whole photo alone
    v = Vocabulary.from_dict(data, TINY_CLASSES)
    rolled = torch.tensor([1.0, 0.2, 0.7, 0.3])
    assert labels(v.select(rolled, 5)) == ["cool"]  # merged with regions: blue's 0.5
    assert labels(v.select(rolled, 5, whole=True)) == ["blue"]
    assert v.thresholds(whole=True).tolist() == pytest.approx([0.9, 0.5, 0.6, 0.25])
    assert Vocabulary.from_dict(v.to_dict(), TINY_CLASSES).to_dict() == v.to_dict()
    assert "whole_threshold" not in str(vocabulary().to_dict())  # none: the one threshold
    fitted = {"tags": {"blue": 0.4}, "depth": {"1": 0.8, "2": 0.7},
              "whole": {"tags": {}, "depth": {"1": 0.6, "2": 0.3}}}  # fmt: skip
    apply_thresholds(data, fitted, default=0.5)
    assert [(t["threshold"], t["whole_threshold"]) for t in data["tags"]] == [
        (0.8, 0.6), (0.7, 0.3), (0.7, 0.3), (0.4, 0.3)
    ]  # fmt: skip
    data["tags"][0]["whole_threshold"] = 1.2
    with pytest.raises(VocabularyError, match="not in"):
        Vocabulary.from_dict(data, TINY_CLASSES)


def test_paths_and_scored_tags_carry_the_tree():
    [scored] = vocabulary().select(torch.tensor([1.0, 0.0, 1.0, 1.0]), 5)
    assert scored.path == ("colour", "cool", "blue") and scored.probability == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["tags"][1].update(classes=["purple"]), "unknown classes"),
        (lambda t: t["tags"][2].update(label="warm", path=["colour", "warm"]), "unique"),
        (lambda t: t["tags"].pop(0), "parent colour is not a tag"),
        (lambda t: t["tags"][1].update(threshold=1.5), "not in \\[0, 1\\]"),
        (lambda t: t["tags"][3].update(classes=["red"]), "one tag only"),
        (lambda t: t["tags"][1].update(path=["colour", "hot"]), "must end with its label"),
    ],
)
def test_a_vocabulary_that_does_not_fit_is_refused(change, message):
    import copy

    broken = copy.deepcopy(TREE)
    change(broken)
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_dict(broken, TINY_CLASSES)


def test_the_vocabulary_round_trips_through_the_card(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE)
    loaded = load(path)
    assert Vocabulary.from_dict(loaded.card.vocabulary, TINY_CLASSES).to_dict() == TREE
    plain = load(write_tiny_checkpoint(tmp_path / "p.safetensors"))
    assert plain.card.vocabulary is None and plain.version != loaded.version
    with pytest.raises(CheckpointError, match="vocabulary is invalid"):
        write_tiny_checkpoint(tmp_path / "b.safetensors", vocabulary={"tags": []})


def test_a_vocabulary_from_manifest_paths():
    v = Vocabulary.from_paths(
        {"red": "colour/warm/red", "green": "colour/cool/green", "blue": "colour/cool/blue"},
        TINY_CLASSES,
    )
    assert [t.label for t in v.tags] == ["colour", "cool", "blue", "green", "warm", "red"]
    assert v.gathered[1] == [1, 2]  # cool: green and blue


def test_the_tagger_returns_vocabulary_tags_or_raw_classes(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE))
    probabilities = torch.tensor([0.1, 0.2, 0.7])
    [tag] = tagger.tags(probabilities)
    assert (tag.label, tag.path) == ("blue", ("colour", "cool", "blue"))
    raw = tagger.tags(probabilities, top_k=2, view="classes")
    assert [(t.label, t.path) for t in raw] == [("blue", None), ("green", None)]
    plain = load_tagger(write_tiny_checkpoint(tmp_path / "p.safetensors"))
    assert [t.path for t in plain.tags(probabilities, top_k=2)] == [("blue",), ("green",)]


def test_a_weighted_fit_counts_each_photo_by_its_weight():
    probabilities = torch.tensor([0.9, 0.8, 0.7, 0.6])
    right = torch.tensor([True, False, True, True])
    assert fit_threshold(probabilities, right, 0.75, 1) == pytest.approx(0.6)  # 3 of 4
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0])  # the wrong photo counts three times
    assert fit_threshold(probabilities, right, 0.75, 1, weights) == pytest.approx(0.9)
    tenth = torch.full((10,), 0.1)  # 9 right of 10 equal weights is 0.9, despite rounding
    assert fit_threshold(torch.linspace(1, 0.1, 10), torch.arange(10) != 9, 0.9, 10, tenth)


# ---- the shipped thresholds on real photos


def coco_dev(*things: str) -> list[tuple[dict, bytes]]:
    """coco-dev's photos showing any of ``things`` (COCO names), with their manifest rows."""
    import json

    root = shared_data("coco-dev")
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    return [(r, (root / r["file"]).read_bytes()) for r in rows if set(things) & set(r["things"])]


def test_real_dog_photos_are_tagged_dog_not_just_animal(default_checkpoint):
    # A dog's mass is spread over breeds and near-dogs: the rolled-up "dog" of a real dog photo
    # is 0.6-0.9, which a threshold fitted on CIFAR-10's 32 px thumbnails (0.92) turned into
    # "animal". Where the dog is the photo's subject, the served tags (regions included) must
    # say "dog".
    tagger = Tagger.load(default_checkpoint)
    dogs = coco_dev("dog")
    assert len(dogs) >= 8, "coco-dev has 9 photos with a dog"
    labels = {row["file"]: [t.label for t in tagger.tag(data)] for row, data in dogs}
    named = [f for f, tags in labels.items() if "dog" in tags]
    assert len(named) >= 2, labels  # the landed thresholds named none
