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


def test_cli_writes_the_checkpoint_and_respects_if_missing(tmp_path: Path, capsys):
    out = tmp_path / "sub" / "default.safetensors"
    assert main(["--out", str(out), "--name", "everyday"]) == 0
    assert load(out).card.name == "everyday"
    first = out.read_bytes()
    assert main(["--out", str(out), "--if-missing"]) == 0
    assert out.read_bytes() == first
    assert "left as it is" in capsys.readouterr().out
