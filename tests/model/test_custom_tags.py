"""Custom tags on the model side: names, the store, fitting, the stacked heads in the forward
pass, corrections, and ``phototag teach``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model.custom_tags import (
    PROBABILITIES,
    WITH_FEATURES,
    WITH_MID,
    CustomHeads,
    CustomTag,
    CustomTagError,
    CustomTagStore,
    Examples,
    Space,
    Suppressions,
    check_name,
    fit,
)
from model.tagger import Scores
from model.teach import Limits, main, serve_tags, teach
from tests.helpers import (
    COLORS,
    load_tagger,
    photo_bytes,
    write_lite_checkpoint,
    write_photo_folder,
)

C = 40  # classes of the synthetic examples


def peaked(classes: list[int], count: int, seed: int, num_classes: int = C) -> torch.Tensor:
    """(count, num_classes) class distributions, each peaked on one of ``classes``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, num_classes, generator=g)
    picks = torch.tensor(classes)[torch.randint(len(classes), (count,), generator=g)]
    logits[torch.arange(count), picks] += 5
    return torch.softmax(logits, 1)


def ex(probabilities: torch.Tensor, features: torch.Tensor | None = None) -> Examples:
    """Examples of these class probabilities (and features; none kept by default)."""
    if features is None:
        features = torch.zeros(len(probabilities), 0)
    return Examples(probabilities, features)


NONE = ex(torch.zeros(0, C))
P_ONLY = Space()


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
    result = fit(ex(positives), NONE)  # no negatives: the built-in ones
    assert result.builtin_negatives == C - 2  # every class but the two the positives look like
    assert result.space == PROBABILITIES
    inputs = P_ONLY.inputs(ex(peaked([3, 4], 50, 2)))
    scores = torch.sigmoid(inputs @ result.weight + result.bias)
    others_scores = torch.sigmoid(P_ONLY.inputs(ex(others)) @ result.weight + result.bias)
    assert (scores >= result.threshold).float().mean() > 0.9
    assert (others_scores >= result.threshold).float().mean() < 0.05
    assert result.estimate.precision is None  # no negatives of the user's: not estimated
    assert result.estimate.recall is not None and result.estimate.recall > 0.8


def feature_space(num_features: int = 16) -> Space:
    g = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(C, num_features, generator=g), dim=1)
    return Space(center=torch.full((num_features,), 2.0), directions=directions)


def around(space: Space, direction: int, count: int, seed: int) -> torch.Tensor:
    """(count, F) pooled features: the mean plus one axis, plus noise."""
    g = torch.Generator().manual_seed(seed)
    features = space.center + 0.3 * torch.randn(count, len(space.center), generator=g)
    features[:, direction] += 1.0
    return features


def test_the_features_separate_what_the_class_probabilities_do_not():
    """A concept the classifier has no class for: its photos and others look like the same
    class (Shrek toys and real cats), and only the pooled features tell them apart."""
    space = feature_space()
    positives = ex(peaked([3], 10, 0), around(space, 0, 10, 0))
    negatives = ex(peaked([3], 10, 3), around(space, 5, 10, 3))
    tested = {
        "same": ex(peaked([3], 50, 1), around(space, 0, 50, 1)),
        "other": ex(peaked([3], 50, 2), around(space, 5, 50, 2)),
    }
    hits = {}
    for name, each in {"features": space, "probabilities": P_ONLY}.items():
        result = fit(positives, negatives, each)
        assert result.space == each.name
        hits[name] = {
            k: (torch.sigmoid(each.inputs(v) @ result.weight + result.bias) >= result.threshold)
            .float()
            .mean()
            for k, v in tested.items()
        }
    assert hits["features"]["same"] > 0.9 and hits["features"]["other"] < 0.1
    assert abs(hits["probabilities"]["same"] - hits["probabilities"]["other"]) < 0.3
    inputs = space.inputs(tested["same"])  # unit vectors, half from each part
    torch.testing.assert_close(inputs.norm(dim=1), torch.ones(50))
    torch.testing.assert_close(inputs[:, :C].norm(dim=1), torch.full((50,), 0.5**0.5))


def test_the_built_in_negatives_of_a_feature_space_are_class_directions():
    space = feature_space()
    exclude = torch.zeros(C, dtype=torch.bool)
    exclude[3] = True
    protos = space.prototypes(C, exclude)
    assert protos.shape == (C - 1, C + 16)
    torch.testing.assert_close(protos[:, C:] / 0.5**0.5, space.directions[~exclude])
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(C - 1))
    result = fit(ex(peaked([3], 10, 0), around(space, 0, 10, 0)), NONE, space)
    assert result.builtin_negatives == C - 1 and result.weight.shape == (C + 16,)


def test_without_features_a_tag_is_fitted_and_served_on_the_probabilities(tmp_path):
    """A tag written before features were kept (format 1): it loads, is served exactly as
    before in a space with features, and stays on the probabilities when taught more."""
    from safetensors.torch import save

    space = feature_space()
    old = CustomTag.new("shrek", "v1", C)
    old.add(ex(peaked([3], 6, 0)), NONE)
    old.refit(space)  # no features: the probabilities only
    assert old.space == PROBABILITIES and old.weight.shape == (C,)
    header = {
        "format_version": 1, "name": "shrek", "backbone": "v1", "space": PROBABILITIES,
        "bias": old.bias, "threshold": old.threshold, "estimate": old.estimate.to_dict(),
        "builtin_negatives": old.builtin_negatives, "sources": [None] * 6,
    }  # fmt: skip
    tensors = {"positives": old.positives.probabilities, "negatives": torch.zeros(0, C),
               "weight": old.weight}  # fmt: skip
    folder = tmp_path / "m"
    folder.mkdir()
    import json

    (folder / "shrek.safetensors").write_bytes(
        save(tensors, metadata={"phototag_custom_tag": json.dumps(header)})
    )
    store = CustomTagStore(tmp_path)
    loaded = store.load("m", "shrek")
    assert not loaded.stale("v1") and not loaded.positives.has_features
    photos = peaked(list(range(C)), 7, 5)
    features = around(space, 1, 7, 5)
    served = CustomHeads.of([loaded], space).probabilities(Examples(photos, features))[:, 0]
    alone = torch.sigmoid(P_ONLY.inputs(ex(photos)) @ old.weight + old.bias)
    torch.testing.assert_close(served, alone)
    more = teach(
        store, "m", "v1", space, "shrek", ex(peaked([3], 2, 9), around(space, 0, 2, 9)), NONE
    )
    assert more.space == PROBABILITIES and len(more.positives) == 8
    assert store.load("m", "shrek").space == PROBABILITIES


def test_one_negative_keeps_the_threshold_of_no_negatives_and_trains_every_fold():
    """A single negative (one "wrong" through feedback) cannot be held out and tested: the
    positives are cross-validated with it in every fold's training, and the threshold stays
    the one without negatives, not 0.5."""
    positives = ex(peaked([3], 6, 0))
    alone, with_one = fit(positives, NONE), fit(positives, ex(peaked([20], 1, 1)))
    assert alone.threshold > 0.5 and with_one.threshold > 0.5
    assert with_one.estimate.folds == 5 and with_one.estimate.precision is None
    assert with_one.estimate.recall is not None
    negative_score = P_ONLY.inputs(ex(peaked([20], 1, 1))) @ with_one.weight + with_one.bias
    assert torch.sigmoid(negative_score) < 0.5


def test_a_head_that_does_not_fit_the_space_is_left_out_and_the_others_served(caplog):
    space = feature_space()
    good = CustomTag.new("good", "v1", C)
    good.add(ex(peaked([3], 6, 0), around(space, 0, 6, 0)), NONE)
    good.refit(space)
    odd = CustomTag.new("odd", "v1", C)
    odd.weight, odd.space = torch.zeros(C + 3), WITH_FEATURES  # another network's features
    heads = CustomHeads.of([good, odd], space)
    assert heads.names == ("good",)
    assert "not serving custom tag odd" in caplog.text


def test_with_negatives_the_threshold_and_precision_come_from_cross_validation():
    result = fit(ex(peaked([3], 12, 0)), ex(peaked([20, 21], 12, 1)))
    assert result.estimate.folds == 5
    assert result.estimate.precision == 1.0 and result.estimate.recall == 1.0
    assert 0.3 <= result.threshold <= 0.9


def test_a_tag_needs_a_positive():
    with pytest.raises(CustomTagError) as error:
        fit(NONE, ex(peaked([1], 3, 0)))
    assert error.value.code == "no_positives"


def test_the_store_keeps_a_tag_in_one_file_per_model_and_name(tmp_path):
    store = CustomTagStore(tmp_path / "tags")
    tag = CustomTag.new("shrek", "v1", C)
    tag.add(ex(peaked([3], 4, 0)), ex(peaked([9], 2, 1)), positive_sources=["/p/a.jpg"] * 4)
    tag.refit()
    path = store.save("pets", tag)
    assert path == tmp_path / "tags" / "pets" / "shrek.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["shrek.safetensors"]  # no temp left
    again = store.load("pets", "shrek")
    assert torch.equal(again.positives.probabilities, tag.positives.probabilities)
    assert torch.equal(again.weight, tag.weight)
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
        tag.add(ex(peaked([i], 5, i)), ex(peaked([30], 5, 9)))
        tag.refit()
        tags.append(tag)
    heads = CustomHeads.of(tags, P_ONLY)
    assert heads.names == ("a-tag", "b-tag", "c-tag")
    photos = peaked(list(range(C)), 7, 5)
    together = heads.probabilities(ex(photos))  # (7, 3)
    for tag in tags:
        alone = torch.sigmoid(P_ONLY.inputs(ex(photos)) @ tag.weight + tag.bias)
        torch.testing.assert_close(together[:, heads.names.index(tag.name)], alone)
    assert heads.without("b-tag").names == ("a-tag", "c-tag")
    assert heads.without("b-tag").with_tag(tags[0]).names == heads.names


def test_teach_refuses_past_its_limits_and_on_a_stale_tag(tmp_path):
    store = CustomTagStore(tmp_path)
    limits = Limits(max_examples=6, max_tags=1)

    def teach_one(backbone: str, name: str, count: int) -> None:
        teach(store, "m", backbone, P_ONLY, name, ex(peaked([1], count, 0)), NONE, limits=limits)

    teach_one("v1", "one", 4)
    with pytest.raises(CustomTagError, match="at most 6") as error:
        teach_one("v1", "one", 3)
    assert error.value.code == "limit_reached"
    assert len(store.load("m", "one").positives) == 4  # unchanged
    with pytest.raises(CustomTagError, match="1 custom tags"):
        teach_one("v1", "two", 1)
    with pytest.raises(CustomTagError) as error:
        teach_one("v2", "one", 1)
    assert error.value.code == "stale_tag"


def test_one_forward_pass_gives_class_and_custom_tag_probabilities(tiny_checkpoint, tmp_path):
    tagger = load_tagger(tiny_checkpoint)
    red, blue = photo_bytes(color=COLORS["red"]), photo_bytes(color=COLORS["blue"])
    pixels = torch.stack([tagger.pixels(red), tagger.pixels(blue)])
    before = tagger.outputs(pixels)
    store = CustomTagStore(tmp_path)
    examples = before.examples
    teach(store, "tiny", tagger.probabilities_version, tagger.space, "reddish",
          examples[[0, 0, 0]], examples[[1, 1, 1]])  # fmt: skip
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
    teach(
        store, "tiny", "another-one", P_ONLY, "old", ex(peaked([0], 3, 0, 3)), ex(torch.zeros(0, 3))
    )
    tags = serve_tags(store, "tiny", tagger)
    assert [t.name for t in tags] == ["old"] and tags[0].stale(tagger.probabilities_version)
    assert len(tagger.custom_heads) == 0


@pytest.mark.skipif(not importlib.util.find_spec("openvino"), reason="needs openvino")
@pytest.mark.parametrize("network", ["seed_cnn", "lite"])
def test_custom_tags_come_out_of_the_openvino_backend_as_out_of_torch(
    network, tiny_checkpoint, tmp_path
):
    checkpoint = tiny_checkpoint
    if network == "lite":
        checkpoint = write_lite_checkpoint(tmp_path / "tiny.safetensors")
    photos = [photo_bytes(color=c) for c in COLORS.values()]
    taggers = [load_tagger(checkpoint, backend=b) for b in ("torch", "openvino")]
    assert taggers[1].backend == "openvino"
    assert taggers[0].space.name == (WITH_MID if network == "lite" else PROBABILITIES)
    store = CustomTagStore(tmp_path)
    scores = taggers[0].outputs(torch.stack([taggers[0].pixels(p) for p in photos]))
    examples = scores.examples
    teach(store, "tiny", taggers[0].probabilities_version, taggers[0].space, "first",
          examples[:1], examples[1:])  # fmt: skip
    results = []
    for tagger in taggers:
        serve_tags(store, "tiny", tagger)
        results.append(tagger.outputs(torch.stack([tagger.pixels(p) for p in photos])))
    torch.testing.assert_close(results[0].custom, results[1].custom, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0].mid, results[1].mid, atol=1e-4, rtol=1e-4)
    assert results[1].custom.shape == (3, 1) and results[1].features.shape[0] == 3
    assert store.load("tiny", "first").space == taggers[0].space.name


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


def a_tag_kept_without_features(tmp_path):
    """``reddish`` taught by ``phototag teach`` on a network whose heads read features, then
    rewritten without them, as a format-1 file kept it: (argv, photos, store)."""
    checkpoint = write_lite_checkpoint(tmp_path / "lite.safetensors")
    photos = write_photo_folder(tmp_path / "photos", per_class=3)
    argv = ["--checkpoint", str(checkpoint)]
    assert main(["reddish", "--positive", str(photos / "red"), *argv]) == 0
    store = CustomTagStore(tmp_path / "custom-tags")
    tag = store.load("lite", "reddish")
    assert tag.space == WITH_MID and tag.positives.has_features and tag.positives.has_mid
    tag.positives = ex(tag.positives.probabilities)
    tag.refit()
    store.save("lite", tag)
    assert store.load("lite", "reddish").space == PROBABILITIES
    return argv, photos, store


def test_phototag_teach_refit_gives_a_tag_kept_without_features_the_features(tmp_path, capsys):
    """A tag taught before the features were kept, on a network whose heads read them: --refit
    reads its photos again, and it is fitted on the features too."""
    argv, _, store = a_tag_kept_without_features(tmp_path)
    assert main(["--refit", *argv]) == 0
    fresh = store.load("lite", "reddish")
    assert fresh.space == WITH_MID and len(fresh.positives) == 3
    capsys.readouterr()
    assert main(["--refit", *argv]) == 0
    assert capsys.readouterr().out.strip() == "reddish: up to date"


def test_phototag_teach_refit_leaves_a_served_tag_whose_photos_are_gone(tmp_path, capsys):
    argv, photos, store = a_tag_kept_without_features(tmp_path)  # still served
    next((photos / "red").iterdir()).unlink()
    assert main(["--refit", *argv]) == 1
    assert "left as it is: 1 photos unreadable" in capsys.readouterr().err
    kept = store.load("lite", "reddish")
    assert kept.space == PROBABILITIES and len(kept.positives) == 3


def test_a_tag_fitted_before_the_mid_level_features_is_served_as_it_was(tmp_path):
    """A format-2 tag (class probabilities and pooled features) on a model whose heads also read
    mid-level features: the same probabilities as in its own space, and taught more, it stays
    in that space (its old examples have no mid-level features)."""
    torch.manual_seed(3)
    center, mid_center = torch.randn(6), torch.randn(4)
    directions = F.normalize(torch.randn(C, 6), dim=1)
    old_space, new_space = Space(center, directions), Space(center, directions, mid_center)
    assert (old_space.name, new_space.name) == (WITH_FEATURES, WITH_MID)
    positives = Examples(peaked([0, 1], 5, 0), torch.randn(5, 6))
    tag = CustomTag.new("old", "v1", C, 6)
    tag.add(positives, positives[:0])
    tag.refit(old_space)
    assert tag.space == WITH_FEATURES
    photos = Examples(peaked(list(range(C)), 7, 5), torch.randn(7, 6), torch.randn(7, 4))
    served = CustomHeads.of([tag], new_space).probabilities(photos)[:, 0]
    alone = torch.sigmoid(old_space.inputs(photos) @ tag.weight + tag.bias)
    torch.testing.assert_close(served, alone)
    tag.add(photos[:2], photos[2:4])  # with mid-level features, beside examples without
    tag.refit(new_space)
    assert tag.space == WITH_FEATURES and not tag.positives.has_mid
    assert not tag.current("v1", new_space)
    fresh = CustomTag.from_bytes(tag.to_bytes())
    assert fresh.positives.mid.shape == (7, 0) and fresh.space == WITH_FEATURES


def test_mid_level_features_are_kept_in_the_tag_file_and_read_by_its_head():
    torch.manual_seed(4)
    space = Space(torch.randn(6), F.normalize(torch.randn(C, 6), dim=1), torch.randn(4))
    positives = Examples(peaked([0], 6, 0), torch.randn(6, 6), torch.randn(6, 4) + 3)
    negatives = Examples(peaked([0], 6, 1), torch.randn(6, 6), torch.randn(6, 4) - 3)
    tag = CustomTag.new("scene", "v1", C, 6, 4)
    tag.add(positives, negatives)
    tag.refit(space)
    assert tag.space == WITH_MID and len(tag.weight) == C + 6 + 4
    fresh = CustomTag.from_bytes(tag.to_bytes())
    torch.testing.assert_close(fresh.positives.mid, positives.mid)
    torch.testing.assert_close(fresh.weight, tag.weight)
    # only the mid-level features tell these apart: the head reads them
    scores = CustomHeads.of([fresh], space).probabilities(positives + negatives)[:, 0]
    assert scores[:6].min() > scores[6:].max()
