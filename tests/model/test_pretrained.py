from pathlib import Path

import pytest
import torch
from PIL import Image

from model.checkpoint import load
from model.preprocess import build_eval_transform
from model.pretrained import imagenet_classes, main

skimage_data = pytest.importorskip(
    "skimage.data", reason="scikit-image ([dev] extra) ships chelsea"
)

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "lynx"}


def test_default_checkpoint_card_describes_imagenet(default_checkpoint: Path):
    card = load(default_checkpoint).card
    assert card.arch == "efficientnet_lite0"
    assert card.task == "single_label"
    assert card.classes == imagenet_classes() and len(card.classes) == 1000
    pre = card.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)


def test_egyptian_cat_photo_gets_cat_classes_on_top(default_checkpoint: Path):
    checkpoint = load(default_checkpoint)
    net = checkpoint.build_model()
    photo = Image.fromarray(skimage_data.chelsea())
    x = build_eval_transform(checkpoint.card.preprocess)(photo).unsqueeze(0)
    with torch.inference_mode():
        probs = net(x).softmax(dim=1)[0]
    top3 = [checkpoint.card.classes[i] for i in probs.topk(3).indices]
    assert set(top3) <= CAT_CLASSES, top3
    assert top3[0] == "Egyptian cat"


def test_the_lite2_backbone_builds_a_checkpoint_that_tags_the_cat(tmp_path: Path, capsys):
    out = tmp_path / "lite2.safetensors"
    assert main(["--backbone", "lite2", "--out", str(out)]) == 0
    assert "efficientnet_lite2" in capsys.readouterr().out
    checkpoint = load(out)
    card = checkpoint.card
    assert (card.name, card.arch) == ("imagenet-efficientnet-lite2", "efficientnet_lite2")
    assert (card.preprocess.resize, card.preprocess.crop) == (292, 260)
    assert card.classes == imagenet_classes() and card.vocabulary
    net = checkpoint.build_model()
    x = build_eval_transform(card.preprocess)(Image.fromarray(skimage_data.chelsea()))
    with torch.inference_mode():
        probs = net(x.unsqueeze(0)).softmax(dim=1)[0]
    top3 = [card.classes[i] for i in probs.topk(3).indices]
    assert set(top3) <= CAT_CLASSES, top3


def test_cli_writes_the_checkpoint_and_respects_if_missing(tmp_path: Path, capsys):
    out = tmp_path / "sub" / "default.safetensors"
    assert main(["--out", str(out), "--name", "everyday"]) == 0
    assert load(out).card.name == "everyday"
    first = out.read_bytes()
    assert main(["--out", str(out), "--if-missing"]) == 0
    assert out.read_bytes() == first
    assert "left as it is" in capsys.readouterr().out


def test_the_default_checkpoint_carries_the_imagenet_vocabulary(default_checkpoint: Path):
    from model.vocabulary import Vocabulary

    card = load(default_checkpoint).card
    vocabulary = Vocabulary.from_dict(card.vocabulary, card.classes)
    by_label = {tag.label: tag for tag in vocabulary.tags}
    assert by_label["cat"].path == ("animal", "cat")
    gathered = {
        vocabulary.classes[i] for i in vocabulary.gathered[vocabulary.tags.index(by_label["cat"])]
    }
    assert {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"} <= gathered


def test_the_shipped_vocabulary_tags_every_class_it_does_not_hide():
    from model.vocabulary import Vocabulary, shipped

    data = shipped("imagenet")
    vocabulary = Vocabulary.from_dict(data, imagenet_classes())
    assigned = {c for tag in vocabulary.tags for c in tag.classes}
    assert assigned | set(vocabulary.hidden) == set(imagenet_classes())
    categories = [tag for tag in vocabulary.tags if len(tag.path) == 1]
    assert 15 <= len(categories) <= 30
    for category in categories:  # every category has tags under it
        assert any(t.path[0] == category.label and len(t.path) > 1 for t in vocabulary.tags)
    assert {"person", "portrait", "group"}.isdisjoint(t.label for t in vocabulary.tags)
    assert all(0 < tag.threshold <= 1 for tag in vocabulary.tags)
    folder = Path(__file__).resolve().parents[2] / "model" / "vocabularies"
    assert (
        "WordNet 3.0 Copyright 2006 by Princeton University"
        in (folder / "LICENSE-WordNet").read_text()
    )


@pytest.mark.parametrize("regions", [0, 4])
@pytest.mark.parametrize(
    ("photo", "expected"),
    [("chelsea", ("animal", "cat")), ("coffee", ("drink", "coffee"))],
)
def test_everyday_photos_get_the_tag_a_person_would_write(
    default_checkpoint, photo, expected, regions
):
    """Served with regions (the default) or the whole photo alone, each at its thresholds."""
    import io

    from tests.helpers import load_tagger

    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage_data, photo)()).save(buffer, format="JPEG", quality=90)
    tags = load_tagger(default_checkpoint, regions=regions).tag(buffer.getvalue())
    assert tags and tags[0].path == expected, tags


def test_a_photo_nothing_in_the_vocabulary_fits_gets_no_junk_tags(default_checkpoint):
    """The Hubble deep field: no ImageNet class fits; before the vocabulary, its top tag was
    "loudspeaker 0.17"."""
    import io

    from tests.helpers import load_tagger

    buffer = io.BytesIO()
    Image.fromarray(skimage_data.hubble_deep_field()).save(buffer, format="JPEG", quality=90)
    assert load_tagger(default_checkpoint).tag(buffer.getvalue()) == []


def test_the_api_examples_show_the_default_checkpoints_version(default_checkpoint: Path):
    """The version names what the model computes, so it is the same on every machine: the
    OpenAPI examples (and the README) can show the real one."""
    from app.schemas import EXAMPLE_MODEL

    assert load(default_checkpoint).version == EXAMPLE_MODEL["version"]
    assert (
        f'"version": "{EXAMPLE_MODEL["version"]}"'
        in (Path(__file__).resolve().parents[2] / "README.md").read_text()
    )


def test_a_checkpoint_with_an_earlier_build_of_the_vocabulary_is_told_apart():
    """The server warns about it (app/registry.py): its thresholds were fitted for another
    phototag."""
    import copy
    from dataclasses import replace

    from model.pretrained import default_card, outdated_vocabulary

    card = default_card()
    assert not outdated_vocabulary(card)
    earlier = copy.deepcopy(card.vocabulary)
    earlier["tags"][0]["threshold"] = 0.42
    assert outdated_vocabulary(replace(card, vocabulary=earlier))
    assert not outdated_vocabulary(replace(card, vocabulary={**earlier, "name": "pets"}))
    assert not outdated_vocabulary(replace(card, vocabulary=None))
