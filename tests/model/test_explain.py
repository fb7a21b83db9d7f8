"""Why this tag: heatmaps from the last feature maps (model/explain.py), right, not just pretty."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model import architectures
from model.checkpoint import load as load_checkpoint
from model.checkpoint import save
from model.custom_tags import WITH_MID, CustomHeads, CustomTagStore, Examples, Space
from model.explain import (
    Explainer,
    Heatmap,
    Target,
    class_target,
    custom_target,
    explain,
    feature_layer,
    on_photo,
    overlay_png,
)
from model.preprocess import Preprocess, crop_box, normalize, resize_and_crop
from model.tagger import UnknownTag
from model.teach import serve_tags, teach
from tests.helpers import (
    COLORS,
    TINY_CLASSES,
    load_tagger,
    photo_bytes,
    write_lite_checkpoint,
    write_tiny_checkpoint,
)
from tests.model.test_vocabulary import TREE

skimage_data = pytest.importorskip("skimage.data")

# ImageNet's mean colour: the padding of the left/right canvas, as neutral as a photo gets
GREY = (124, 116, 104)


def cat_and_coffee() -> Image.Image:
    """A cat (skimage's chelsea) in the left half and a coffee cup (skimage's coffee) in the
    right half, each 224 x 224, in the middle band of a 448 x 448 canvas."""
    canvas = Image.new("RGB", (448, 448), GREY)
    canvas.paste(Image.fromarray(skimage_data.chelsea()).resize((224, 224)), (0, 112))
    canvas.paste(Image.fromarray(skimage_data.coffee()).resize((224, 224)), (224, 112))
    return canvas


@pytest.mark.slow
def test_the_cat_is_on_the_left_and_the_coffee_on_the_right(default_checkpoint):
    """The default preprocessing resizes the shorter side to 256 and keeps the middle 224 x 224:
    a 448 x 224 strip would lose all but the cat's right half and the cup's left half. So the two
    photos sit in the middle band of a square canvas, where the crop keeps x and y in [28, 420]:
    seven eighths of each photo, the same share of each. The photo goes through the server's
    own geometry (``Tagger.crop``), the heatmap is mapped back onto the canvas the user sent
    (``on_photo``: the grid over the crop's region, 0 outside), and the mass is compared on
    either side of the canvas's middle, which is also the crop's. Measured: 0.97 for the cat,
    0.001 for the coffee."""
    tagger = load_tagger(default_checkpoint)
    canvas = cat_and_coffee()
    pixels = tagger.crop(canvas)
    left = {}
    for tag in ("cat", "coffee"):
        heatmap = tagger.explain(pixels, tag)
        assert heatmap.tag == tag and heatmap.path[-1] == tag
        full = on_photo(heatmap, canvas.size, tagger.card.preprocess)  # (448, 448)
        left[tag] = float(full[:, :224].sum() / full.sum())
    assert left["cat"] > 0.85, left
    assert left["coffee"] < 0.15, left


@pytest.mark.slow
def test_the_top_tag_is_explained_when_none_is_named(default_checkpoint):
    tagger = load_tagger(default_checkpoint)
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buffer, format="JPEG")
    pixels = tagger.pixels(buffer.getvalue())
    top = tagger.tags(tagger.probabilities(pixels[None])[0], 1)[0]
    heatmap = tagger.explain(pixels)
    assert (heatmap.tag, heatmap.path) == (top.label, top.path)
    assert heatmap.probability == pytest.approx(top.probability, abs=1e-4)


# Per registered architecture: its input size and the module the rule must find, the last
# spatial map before the pooling or flatten.
FEATURE_LAYERS = {
    "efficientnet_lite0": (64, "features.2"),  # the 1x1 head conv block, before the avg pool
    "efficientnet_lite2": (64, "features.2"),
    "seed_cnn": (32, "features.5"),  # the last max-pool, before the flatten
    "resnet18": (64, "features.layer4"),  # the last stage, residual sums included
    "resnet50": (64, "features.layer4"),
    "mobilenet_v3_small": (64, "features.features"),
    "mobilenet_v3_large": (64, "features.features"),
    "efficientnet_b0": (64, "features.features"),
}
AVERAGE_POOLED = {
    "efficientnet_lite0",
    "efficientnet_lite2",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
}


def test_every_registered_architecture_is_covered():
    assert sorted(FEATURE_LAYERS) == architectures.available()


@pytest.mark.parametrize("arch", sorted(FEATURE_LAYERS))
def test_the_feature_layer_is_the_map_the_pooling_reads(arch):
    size, expected = FEATURE_LAYERS[arch]
    torch.manual_seed(0)
    args = {"input_size": 32, "widths": [4, 8], "hidden": [16]} if arch == "seed_cnn" else {}
    net = architectures.build(arch, 3, **args).eval()
    assert feature_layer(net, size) == expected
    explainer = Explainer(net, Preprocess(resize=size, crop=size), 1.0)
    pixels = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    forward = explainer.forward(pixels)
    batch, _, h, w = forward.feature_map.shape
    assert batch == 1 and h * w > 1
    if arch in AVERAGE_POOLED:  # the pooled features are exactly the map's mean
        pooled = forward.feature_map.detach().mean(dim=(2, 3))
        torch.testing.assert_close(pooled, forward.features.detach(), rtol=1e-4, atol=1e-5)
    heatmap = explainer.heatmap(forward, logit_of(1))
    assert heatmap.grid.shape == (h, w)


def value(tensor: torch.Tensor) -> float:
    return float(tensor.detach())


def logit_of(index: int) -> Target:
    return class_target(["a", "b", "c"], index, "single_label")


def test_on_an_average_pooled_network_the_heatmap_is_the_class_activation_map():
    """HiResCAM of a class logit on global average pooling + a linear head is CAM exactly:
    relu(sum_k w_ck A_k), the head's weights for the class over the feature map."""
    torch.manual_seed(1)
    net = architectures.build("efficientnet_lite0", 10).eval()
    explainer = Explainer(net, Preprocess(resize=96, crop=96), 1.7)
    forward = explainer.forward(torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8))
    compared = 0
    for index in range(10):
        heatmap = explainer.heatmap(forward, class_target([str(i) for i in range(10)], index, ""))
        weights = explainer.net.head[-1].weight[index]  # (F,)
        cam = torch.einsum("k,khw->hw", weights, forward.feature_map.detach()[0]).clamp(min=0)
        if cam.max() > 0:  # a random network has classes with no positive evidence anywhere
            np.testing.assert_allclose(heatmap.grid, (cam / cam.max()).numpy(), atol=1e-5)
            compared += 1
        else:
            assert not heatmap.grid.any()
    assert compared >= 3


def test_a_vocabulary_tag_differentiates_the_log_of_its_rolled_up_probability(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE, temperature=1.5)
    tagger = load_tagger(ckpt)
    pixels = tagger.pixels(photo_bytes((50, 40), color=(30, 60, 200)))
    probabilities = tagger.probabilities(pixels[None])[0]
    rolled = tagger.vocabulary.roll_up(probabilities, "single_label")
    forward = tagger.explainer().forward(pixels)
    for t, tag in enumerate(tagger.vocabulary.tags):
        target = tagger.target(tag.label)
        score = target.score(*forward.outputs)
        assert value(score) == pytest.approx(float(torch.log(rolled[t])), abs=1e-5)
        probability = target.probability(*forward.outputs)
        assert value(probability) == pytest.approx(float(rolled[t]), abs=1e-5)
        assert target.path == tag.path
    # "cool" gathers green and blue: its gradient is the sum of theirs, weighted by probability
    cool = tagger.target("cool").score(*forward.outputs)
    p = torch.softmax(forward.logits, dim=1)[0]
    (grad,) = torch.autograd.grad(cool.sum(), forward.logits)
    expected = p[1:] / p[1:].sum() - p[1:]
    torch.testing.assert_close(grad[0, 1:] * 1.0, expected, rtol=1e-4, atol=1e-6)


def test_a_raw_class_differentiates_its_logit_and_a_multi_label_tag_its_likeliest(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "c.safetensors", temperature=1.5)
    tagger = load_tagger(ckpt)
    pixels = tagger.pixels(photo_bytes((50, 40)))
    forward = tagger.explainer().forward(pixels)
    target = tagger.target("green", view="classes")
    assert target.path is None
    assert value(target.score(*forward.outputs)) == value(forward.logits[0, 1])
    probabilities = tagger.probabilities(pixels[None])[0]
    assert value(target.probability(*forward.outputs)) == pytest.approx(
        float(probabilities[1]), abs=1e-5
    )
    assert tagger.target("green").path == ("green",)  # no vocabulary: the classes are the tags
    multi = load_tagger(
        write_tiny_checkpoint(tmp_path / "m.safetensors", task="multi_label", vocabulary=TREE)
    )
    forward = multi.explainer().forward(pixels)
    cool = multi.target("cool")  # green and blue: the larger of their logits
    expected = forward.logits[0, 1:].max()
    assert value(cool.score(*forward.outputs)) == value(expected)
    assert value(cool.probability(*forward.outputs)) == pytest.approx(
        value(torch.sigmoid(expected))
    )


def test_an_unknown_tag_is_refused_with_where_to_find_the_known_ones(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE))
    with pytest.raises(UnknownTag, match=r"no vocabulary tag 'purple' \(it has 4: colour, warm"):
        tagger.target("purple")
    with pytest.raises(UnknownTag, match=r"no class 'warm' \(it has 3: red, green, blue\)$"):
        tagger.target("warm", view="classes")  # a tag, not a class
    assert tagger.target("red", view="classes").label == "red"


def teach_reddish(tagger, store_dir, name: str = "reddish") -> None:
    """Teach ``name`` on ``tagger`` (red photos against blue ones) and serve it, as the server
    does."""
    photos = [photo_bytes(color=COLORS[c], seed=i) for c in ("red", "blue") for i in range(3)]
    scores = tagger.outputs(torch.stack([tagger.pixels(p) for p in photos]))
    examples = scores.examples
    store = CustomTagStore(store_dir)
    space = tagger.space
    teach(store, "m", tagger.probabilities_version, space, name, examples[:3], examples[3:])
    serve_tags(store, "m", tagger)


def lively_lite_checkpoint(path: Path) -> Path:
    """:func:`tests.helpers.write_lite_checkpoint`'s random EfficientNet-Lite0 with its
    BatchNorm statistics measured on a few photos: at its initial ones its pooled features
    vanish (about 1e-9), and so would a custom tag's heatmap."""
    checkpoint = load_checkpoint(write_lite_checkpoint(path))
    net, preprocess = checkpoint.build_model("cpu"), checkpoint.card.preprocess
    photos = [photo_bytes((80, 70), c, seed=i, noise=80) for c in COLORS.values() for i in range(4)]
    batch = torch.stack([resize_and_crop(Image.open(io.BytesIO(p)), preprocess) for p in photos])
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the plain average over the batch
    with torch.no_grad():
        net.train().features(normalize(batch, preprocess))
    return save(path, net.eval(), checkpoint.card)


@pytest.mark.parametrize("network", ["seed_cnn", "lite"])  # probabilities; and features too
def test_a_custom_tag_reports_its_served_probability_and_differentiates_its_heads_logit(
    network, tmp_path
):
    if network == "lite":
        checkpoint = lively_lite_checkpoint(tmp_path / "m.safetensors")
    else:
        checkpoint = write_tiny_checkpoint(tmp_path / "m.safetensors", temperature=1.5)
    tagger = load_tagger(checkpoint)
    assert (tagger.space.name == WITH_MID) == (network == "lite")
    teach_reddish(tagger, tmp_path / "tags")
    for seed, colour in enumerate(("red", "blue", "green")):
        pixels = tagger.pixels(photo_bytes((60, 45), COLORS[colour], seed=seed, noise=80))
        served = float(tagger.outputs(pixels[None]).custom[0, 0])  # what /v1/tags reports
        target = tagger.target("custom/reddish")
        assert (target.label, target.path) == ("reddish", ("custom", "reddish"))
        forward = tagger.explainer().forward(pixels)
        probability = value(target.probability(*forward.outputs))
        assert probability == pytest.approx(served, abs=1e-5)
        score = value(target.score(*forward.outputs))
        assert score == pytest.approx(float(torch.logit(torch.tensor(served))), abs=1e-3)
        heatmap = tagger.explain(pixels, "custom/reddish")
        assert (heatmap.tag, heatmap.path) == ("reddish", ("custom", "reddish"))
        assert heatmap.probability == pytest.approx(served, abs=1e-5)
        assert np.isfinite(heatmap.grid).all() and heatmap.grid.max() == pytest.approx(1.0)
        assert heatmap.grid.min() < heatmap.grid.max()  # not constant: somewhere, not everywhere
    bare = tagger.explain(pixels, "reddish")  # no tag of the model's is called that
    np.testing.assert_array_equal(bare.grid, heatmap.grid)


def test_a_custom_tags_score_has_a_finite_gradient_where_a_class_probability_is_zero():
    """sqrt's slope is infinite at 0: differentiated through sqrt(p), a photo whose softmax
    underflows to 0 for some class would get a NaN gradient; the score's roots are shifted
    (``ROOT_EPS``), its probability is the served one."""
    torch.manual_seed(0)
    heads = CustomHeads(Space(), ("x",), torch.randn(3, 1), torch.zeros(1), (0.5,))
    logits = torch.tensor([[0.0, 200.0, -10.0]], requires_grad=True)  # p = (0, 1, 0) in float32
    features, mid = torch.zeros(1, 0), torch.zeros(1, 0)
    probabilities = torch.softmax(logits, 1)
    assert (probabilities == 0).any()
    (bare,) = torch.autograd.grad((probabilities.sqrt() @ heads.weight).sum(), logits)
    assert torch.isnan(bare).all()  # sqrt's infinite slope at 0 times softmax's zero slope
    served = heads.probabilities(Examples(probabilities, features, mid))[:, 0]
    target = custom_target(heads, 0, "single_label")
    (grad,) = torch.autograd.grad(target.score(logits, features, mid).sum(), logits)
    assert torch.isfinite(grad).all()
    assert value(target.probability(logits, features, mid)) == pytest.approx(value(served))


def test_the_models_own_tag_comes_before_a_custom_tags_bare_name(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE))
    teach_reddish(tagger, tmp_path / "tags", name="warm")
    assert tagger.target("warm").path == ("colour", "warm")  # the vocabulary's
    assert tagger.target("custom/warm").path == ("custom", "warm")
    with pytest.raises(UnknownTag, match=r"no custom tag 'nope' \(it has 1: custom/warm\)$"):
        tagger.target("custom/nope")
    with pytest.raises(UnknownTag, match=r"no vocabulary tag 'purple' .*; custom tags: 1: custom/"):
        tagger.target("purple")
    with pytest.raises(UnknownTag, match=r"no class 'custom/warm' \(it has 3: red, green, blue\)$"):
        tagger.target("custom/warm", view="classes")  # the raw classes have no custom tags


def test_the_grid_is_normalised_to_one_at_its_strongest(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "t.safetensors", seed=2))
    for seed, label in enumerate(TINY_CLASSES):
        pixels = tagger.pixels(photo_bytes((60, 45), seed=seed, noise=80))
        heatmap = tagger.explain(pixels, label)
        grid = heatmap.grid
        assert grid.dtype == np.float32 and grid.min() >= 0
        assert grid.max() == pytest.approx(1.0) or not grid.any()


def test_a_bare_network_can_be_explained_too(tmp_path):
    net = architectures.build("seed_cnn", 3, input_size=32, widths=[4, 8], hidden=[16]).eval()
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    heatmap = explain(net, pixels, logit_of(0), Preprocess(resize=36, crop=32))
    assert heatmap.grid.shape == (8, 8) and heatmap.tag == "a"


def test_explanations_on_several_threads_at_once_equal_one_at_a_time(tmp_path):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "t.safetensors", seed=5))
    photos = [tagger.pixels(photo_bytes((60, 45), seed=s, noise=90)) for s in range(6)]
    alone = [tagger.explain(p, "red").grid for p in photos]
    together: list[np.ndarray | None] = [None] * len(photos)
    start = threading.Barrier(len(photos))

    def run(i: int) -> None:
        start.wait()
        together[i] = tagger.explain(photos[i], "red").grid

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(photos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("size", [(448, 448), (640, 480), (480, 640), (100, 900), (2000, 300)])
def test_the_crop_box_is_where_resize_and_crop_takes_its_pixels(size):
    """An image whose red channel is its x and green its y (scaled): the cropped pixels' corners
    say which part of the image they came from."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([xs * 255 / width, ys * 255 / height, np.zeros_like(xs)], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    pre = Preprocess(resize=64, crop=56)
    crop = resize_and_crop(image, pre).numpy().astype(float)  # (3, 56, 56)
    left, top, right, bottom = crop_box(size, pre)
    step_x, step_y = 255 / width, 255 / height
    tolerance = 2.5  # the filter's footprint and uint8 rounding
    assert crop[0, :, 0].mean() / step_x == pytest.approx(left, abs=tolerance * width / 56 + 2)
    assert crop[0, :, -1].mean() / step_x == pytest.approx(right, abs=tolerance * width / 56 + 2)
    assert crop[1, 0, :].mean() / step_y == pytest.approx(top, abs=tolerance * height / 56 + 2)
    assert crop[1, -1, :].mean() / step_y == pytest.approx(bottom, abs=tolerance * height / 56 + 2)


def test_the_overlay_is_a_png_of_the_photos_size_written_atomically(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "t.safetensors", seed=1, vocabulary=TREE)
    tagger = load_tagger(ckpt)
    data = photo_bytes((150, 90), color=(40, 40, 190), fmt="PNG")
    out = tmp_path / "overlays" / "photo.png"
    heatmap = tagger.write_overlay(data, out, "blue")
    assert heatmap.tag == "blue" and heatmap.path == ("colour", "cool", "blue")
    written = Image.open(out)
    assert (written.format, written.size) == ("PNG", (150, 90))
    assert [p.name for p in out.parent.iterdir()] == ["photo.png"]  # no temp file left
    # the part the network never saw (outside the centre square) is darkened
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    png = overlay_png(photo, heatmap, tagger.card.preprocess, max_side=75)
    small = Image.open(io.BytesIO(png))
    assert small.size == (75, 45)
    ours, theirs = np.asarray(written, dtype=float), np.asarray(photo, dtype=float)
    assert ours[:, :5].mean() < 0.5 * theirs[:, :5].mean()


@pytest.mark.parametrize("orientation", [1, 6])  # as stored; turned a quarter by EXIF
def test_a_jpeg_decoded_at_a_draft_scale_gets_an_overlay_of_its_full_size(tmp_path, orientation):
    tagger = load_tagger(write_tiny_checkpoint(tmp_path / "t.safetensors"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = photo_bytes((320, 240), exif=exif.tobytes())
    image = tagger.photo(data)
    upright = (320, 240) if orientation == 1 else (240, 320)
    assert max(image.size) < 320  # decoded at a draft scale (the tiny model reads 36 px)
    tagger.write_overlay(data, tmp_path / "o.png")
    assert Image.open(tmp_path / "o.png").size == upright


def test_a_photo_overlay_maps_the_grid_inside_the_crop_only():
    heatmap = Heatmap(np.ones((4, 4), dtype=np.float32), "x", 1.0)
    full = on_photo(heatmap, (300, 100), Preprocess(resize=50, crop=40))
    box = [round(v) for v in crop_box((300, 100), Preprocess(resize=50, crop=40))]
    assert full.shape == (100, 300)
    assert full[box[1] : box[3], box[0] : box[2]].min() == pytest.approx(1.0)
    assert full[:, : box[0]].max() == 0 and full[:, box[2] :].max() == 0
