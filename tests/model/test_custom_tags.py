"""Custom tags on the model side: names, the store, fitting, the stacked heads in the forward
pass, corrections, and ``phototag teach``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model.custom_tags import (
    CustomHeads,
    CustomTag,
    CustomTagError,
    CustomTagStore,
    Suppressions,
    check_name,
    fit,
    head_inputs,
)
from model.tagger import Scores
from model.teach import Limits, main, serve_tags, teach
from tests.helpers import COLORS, load_tagger, photo_bytes, write_photo_folder

C = 40  # classes of the synthetic examples


def peaked(classes: list[int], count: int, seed: int, num_classes: int = C) -> torch.Tensor:
    """(count, num_classes) class distributions, each peaked on one of ``classes``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, num_classes, generator=g)
    picks = torch.tensor(classes)[torch.randint(len(classes), (count,), generator=g)]
    logits[torch.arange(count), picks] += 5
    return torch.softmax(logits, 1)


@pytest.mark.parametrize(
    "name", ["", "Shrek", "../etc", "a/b", ".hidden", "_suppressions", "x" * 49, "sh rek", "é"]
)
def test_a_bad_tag_name_is_refused(name):
    with pytest.raises(CustomTagError) as error:
        check_name(name)
    assert error.value.code == "invalid_tag_name"


@pytest.mark.parametrize("name", ["shrek", "license-plate", "my_cat2", "0", "x" * 48])
def test_good_tag_names_pass(name):
    assert check_name(name) == name


def test_a_fitted_tag_separates_its_concept_from_other_concepts():
    positives, others = peaked([3, 4], 10, 0), peaked(list(range(10, 40)), 200, 1)
    result = fit(positives, torch.zeros(0, C))  # no negatives: the built-in ones
    assert result.builtin_negatives == C - 2  # every class but the two the positives look like
    scores = torch.sigmoid(head_inputs(peaked([3, 4], 50, 2)) @ result.weight + result.bias)
    others_scores = torch.sigmoid(head_inputs(others) @ result.weight + result.bias)
    assert (scores >= result.threshold).float().mean() > 0.9
    assert (others_scores >= result.threshold).float().mean() < 0.05
    assert result.estimate.precision is None  # no negatives of the user's: not estimated
    assert result.estimate.recall is not None and result.estimate.recall > 0.8


def test_with_negatives_the_threshold_and_precision_come_from_cross_validation():
    result = fit(peaked([3], 12, 0), peaked([20, 21], 12, 1))
    assert result.estimate.folds == 5
    assert result.estimate.precision == 1.0 and result.estimate.recall == 1.0
    assert 0.3 <= result.threshold <= 0.9


def test_a_tag_needs_a_positive():
    with pytest.raises(CustomTagError) as error:
        fit(torch.zeros(0, C), peaked([1], 3, 0))
    assert error.value.code == "no_positives"


def test_the_store_keeps_a_tag_in_one_file_per_model_and_name(tmp_path):
    store = CustomTagStore(tmp_path / "tags")
    tag = CustomTag.new("shrek", "v1", C)
    tag.add(peaked([3], 4, 0), peaked([9], 2, 1), positive_sources=["/p/a.jpg"] * 4)
    tag.refit()
    path = store.save("pets", tag)
    assert path == tmp_path / "tags" / "pets" / "shrek.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["shrek.safetensors"]  # no temp left
    again = store.load("pets", "shrek")
    assert torch.equal(again.positives, tag.positives) and torch.equal(again.weight, tag.weight)
    assert again.sources == ["/p/a.jpg"] * 4 + [None, None]
    assert again.info("v1") == tag.info("v1")
    assert store.names("pets") == ["shrek"] and store.names("other") == []
    (path.parent / ".shrek.safetensors.123.tmp").write_bytes(b"half")  # a write in progress
    (path.parent / "broken.safetensors").write_bytes(b"not a tag")
    assert [t.name for t in store.load_all("pets")] == ["shrek"]  # broken: logged, skipped
    store.delete("pets", "shrek")
    with pytest.raises(CustomTagError, match="no custom tag"):
        store.load("pets", "shrek")


def test_stacked_heads_score_every_tag_in_one_multiply_as_each_alone(tmp_path):
    tags = []
    for i, name in enumerate(["b-tag", "a-tag", "c-tag"]):
        tag = CustomTag.new(name, "v1", C)
        tag.add(peaked([i], 5, i), peaked([30], 5, 9))
        tag.refit()
        tags.append(tag)
    heads = CustomHeads.of(tags)
    assert heads.names == ("a-tag", "b-tag", "c-tag")
    photos = peaked(list(range(C)), 7, 5)
    together = heads.probabilities(photos)  # (7, 3)
    for tag in tags:
        alone = torch.sigmoid(head_inputs(photos) @ tag.weight + tag.bias)
        torch.testing.assert_close(together[:, heads.names.index(tag.name)], alone)
    assert heads.without("b-tag").names == ("a-tag", "c-tag")
    assert heads.without("b-tag").with_tag(tags[0]).names == heads.names


def test_teach_refuses_past_its_limits_and_on_a_stale_tag(tmp_path):
    store = CustomTagStore(tmp_path)
    limits = Limits(max_examples=6, max_tags=1)
    teach(store, "m", "v1", "one", peaked([1], 4, 0), torch.zeros(0, C), limits=limits)
    with pytest.raises(CustomTagError, match="at most 6") as error:
        teach(store, "m", "v1", "one", peaked([1], 3, 0), torch.zeros(0, C), limits=limits)
    assert error.value.code == "limit_reached"
    assert len(store.load("m", "one").positives) == 4  # unchanged
    with pytest.raises(CustomTagError, match="1 custom tags"):
        teach(store, "m", "v1", "two", peaked([1], 1, 0), torch.zeros(0, C), limits=limits)
    with pytest.raises(CustomTagError) as error:
        teach(store, "m", "v2", "one", peaked([1], 1, 0), torch.zeros(0, C), limits=limits)
    assert error.value.code == "stale_tag"


def test_one_forward_pass_gives_class_and_custom_tag_probabilities(tiny_checkpoint, tmp_path):
    tagger = load_tagger(tiny_checkpoint)
    red, blue = photo_bytes(color=COLORS["red"]), photo_bytes(color=COLORS["blue"])
    pixels = torch.stack([tagger.pixels(red), tagger.pixels(blue)])
    before = tagger.outputs(pixels)
    store = CustomTagStore(tmp_path)
    teach(store, "tiny", tagger.probabilities_version, "reddish",
          before.probabilities[:1].repeat(3, 1), before.probabilities[1:].repeat(3, 1))  # fmt: skip
    serve_tags(store, "tiny", tagger)
    scores = tagger.outputs(pixels)
    assert scores.custom.shape == (2, 1) and scores.heads.names == ("reddish",)
    torch.testing.assert_close(scores.probabilities, before.probabilities)
    torch.testing.assert_close(tagger.probabilities(pixels), before.probabilities)
    red_scores, blue_scores = scores.unbind()
    tags = tagger.tags(red_scores, top_k=5, threshold=0)
    assert ("custom", "reddish") in [t.path for t in tags]
    assert [t.probability for t in tags] == sorted((t.probability for t in tags), reverse=True)
    assert "reddish" in [t.label for t in tagger.tags(red_scores)]  # its own threshold
    assert "reddish" not in [t.label for t in tagger.tags(blue_scores)]
    assert "reddish" not in [t.label for t in tagger.tags(red_scores, 5, 0, view="classes")]
    assert "reddish" in [t.label for t in tagger.tag(red)]  # the one-call path too


def test_a_stored_tag_of_another_backbone_is_not_served(tiny_checkpoint, tmp_path):
    tagger = load_tagger(tiny_checkpoint)
    store = CustomTagStore(tmp_path)
    teach(store, "tiny", "another-one", "old", peaked([0], 3, 0, 3), torch.zeros(0, 3))
    tags = serve_tags(store, "tiny", tagger)
    assert [t.name for t in tags] == ["old"] and tags[0].stale(tagger.probabilities_version)
    assert len(tagger.custom_heads) == 0


@pytest.mark.skipif(not importlib.util.find_spec("openvino"), reason="needs openvino")
def test_custom_tags_come_out_of_the_openvino_backend_as_out_of_torch(tiny_checkpoint, tmp_path):
    photos = [photo_bytes(color=c) for c in COLORS.values()]
    taggers = [load_tagger(tiny_checkpoint, backend=b) for b in ("torch", "openvino")]
    assert taggers[1].backend == "openvino"
    store = CustomTagStore(tmp_path)
    probabilities = taggers[0].outputs(torch.stack([taggers[0].pixels(p) for p in photos]))
    teach(store, "tiny", taggers[0].probabilities_version, "first",
          probabilities.probabilities[:1], probabilities.probabilities[1:])  # fmt: skip
    results = []
    for tagger in taggers:
        serve_tags(store, "tiny", tagger)
        results.append(tagger.outputs(torch.stack([tagger.pixels(p) for p in photos])))
    torch.testing.assert_close(results[0].custom, results[1].custom, atol=1e-4, rtol=1e-4)
    assert results[1].custom.shape == (3, 1) and results[1].features.shape[0] == 3


def test_a_vocabulary_tag_marked_wrong_is_suppressed_on_that_photo_only(tiny_checkpoint):
    tagger = load_tagger(tiny_checkpoint)
    red, blue = photo_bytes(color=COLORS["red"]), photo_bytes(color=COLORS["blue"])
    red_again = photo_bytes((80, 60), color=COLORS["red"], seed=7)  # a near copy
    scores = {
        k: tagger.outputs(tagger.pixels(v)[None]).unbind()[0]
        for k, v in {"red": red, "blue": blue, "again": red_again}.items()
    }
    assert "green" in [t.label for t in tagger.tags(scores["red"], 5, 0)]
    tagger.suppressions = Suppressions().wrong(scores["red"].features, "green", "v")
    assert "green" not in [t.label for t in tagger.tags(scores["red"], 5, 0)]
    assert "green" not in [t.label for t in tagger.tags(scores["again"], 5, 0)]
    assert "green" in [t.label for t in tagger.tags(scores["blue"], 5, 0)]
    assert "red" in [t.label for t in tagger.tags(scores["red"], 5, 0)]  # other tags stay
    tagger.suppressions = tagger.suppressions.right(scores["again"].features, "green")
    assert "green" in [t.label for t in tagger.tags(scores["red"], 5, 0)]
    assert isinstance(scores["red"], Scores)


def test_phototag_teach_teaches_lists_and_forgets(tiny_checkpoint, tmp_path, capsys):
    photos = write_photo_folder(tmp_path / "photos", per_class=4)
    store = tmp_path / "custom-tags"
    argv = ["--checkpoint", str(tiny_checkpoint)]
    assert main(["reddish", "--positive", str(photos / "red"), "--negative",
                 str(photos / "blue"), *argv]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "reddish: 4 positives, 4 negatives" in out
    assert (store / "tiny" / "reddish.safetensors").is_file()  # beside the checkpoint
    assert main(["--list", *argv]) == 0
    assert "reddish: 4 positives" in capsys.readouterr().out
    assert main(["--refit", *argv]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["reddish", "--forget", *argv]) == 0
    assert not (store / "tiny" / "reddish.safetensors").exists()
    assert main(["../x", "--positive", str(photos / "red"), *argv]) == 2
    assert "not a tag name" in capsys.readouterr().err


def test_phototag_teach_refit_rereads_the_photos_of_a_stale_tag(tiny_checkpoint, tmp_path):
    photos = write_photo_folder(tmp_path / "photos", per_class=3)
    argv = ["--checkpoint", str(tiny_checkpoint)]
    assert main(["reddish", "--positive", str(photos / "red"), *argv]) == 0
    store = CustomTagStore(tmp_path / "custom-tags")
    tag = store.load("tiny", "reddish")
    tag.backbone = "an-older-model"  # as if the checkpoint had been retrained since
    store.save("tiny", tag)
    assert main(["--refit", *argv]) == 0
    fresh = store.load("tiny", "reddish")
    assert fresh.backbone == load_tagger(tiny_checkpoint).probabilities_version
    assert len(fresh.positives) == 3
