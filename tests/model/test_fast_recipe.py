"""airbench's techniques in seed_cnn and the trainer (bench/train_cifar10.sh): shapes, the
whitening layer's statistics, identity init, lookahead, alternating flips, TTA, and a run that
uses them all, resumed and served."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model import architectures, checkpoint, evaluate, train
from model.architectures import PatchWhitening, build, seed_cnn_feature_shape
from model.data import Augment
from model.preprocess import normalize
from model.runtime import ConfigError, RuntimeChoice
from model.tagger import Tagger
from model.training.batches import TrainBatches
from model.training.lookahead import Lookahead
from model.training.processes import Dist
from model.training.recipe import param_groups
from model.tta import TTA
from tests.helpers import COLORS, REPO, photo_bytes, write_photo_folder
from tests.model.test_train import Interrupted, assert_same_tensors, history, stop_after

sys.path.insert(0, str(REPO / "bench"))
import train_cifar10

FAST_NET = train_cifar10.NET | {"widths": [8, 16, 16]}  # the recipe's network, narrow


def fast_config(data: Path, out: Path, **overrides) -> train.TrainConfig:
    values = {
        "data": str(data),
        "out": str(out),
        "arch": "seed_cnn",
        "arch_args": FAST_NET,
        "resize": 32,
        "crop": 32,
        "epochs": 4,
        "batch_size": 8,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.85,
        "schedule": "onecycle",
        "norm_lr_scale": 8.0,
        "whiten_bias_epochs": 2,
        "lookahead_every": 2,
        "label_smoothing": 0.2,
        "grad_clip": 0.0,
        "patience": 0,
        "tta_flip": True,
        "tta_shift": True,
        "workers": 0,
        "threads": 1,
        "augment": Augment(
            random_resized_crop=False, color_jitter=0, translate=0.0625, alternate_flip=True
        ),
    }
    return train.TrainConfig(**(values | overrides))


@pytest.fixture(scope="module")
def square_photos(tmp_path_factory) -> Path:
    """32x32 photos: cached at the crop size, so batches are augmented as tensors."""
    return write_photo_folder(tmp_path_factory.mktemp("square"), 8, size=(32, 32))


def normalised_photos(count: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 3, 1, 1, generator=generator)  # correlated channels, like photos
    return base + 0.3 * torch.randn(count, 3, 32, 32, generator=generator)


# ---- the network


@pytest.mark.parametrize(
    "config",
    [
        {"widths": [8, 16, 16], "convs_per_block": 2, "pool_first": True, "whiten": 2},
        {"widths": [8, 16], "whiten": 3, "global_max_pool": True, "hidden": [12]},
        {"widths": [8, 16, 16], "convs_per_block": 2, "pool_first": True,
         "pool_before_norm": True, "batch_norm": True, "global_max_pool": True},
    ],
)  # fmt: skip
def test_the_shape_arithmetic_covers_whitening_and_the_global_pool(config):
    net = build("seed_cnn", 5, input_size=32, **config)
    c, h, w = seed_cnn_feature_shape(
        32,
        config["widths"],
        convs_per_block=config.get("convs_per_block", 1),
        pool_first=config.get("pool_first", False),
        whiten=config.get("whiten", 0),
    )
    conv_part = net.features[: [type(m) for m in net.features].index(nn.Flatten)]
    out = conv_part(torch.zeros(2, 3, 32, 32))
    if config.get("global_max_pool"):
        assert tuple(out.shape) == (2, c, 1, 1)
    else:
        assert tuple(out.shape) == (2, c, h, w)
    assert tuple(net(torch.zeros(2, 3, 32, 32)).shape) == (2, 5)


def test_whitening_a_2px_patch_loses_one_pixel_and_pooling_before_norm_keeps_the_size():
    assert seed_cnn_feature_shape(32, [64, 256, 256], convs_per_block=2, pool_first=True,
                                  whiten=2) == (256, 3, 3)  # fmt: skip
    early = build("seed_cnn", 10, widths=[8, 16], convs_per_block=2, pool_first=True,
                  batch_norm=True, pool_before_norm=True)  # fmt: skip
    kinds = [type(m).__name__ for m in early.features][:4]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]


def test_the_whitening_layer_makes_the_patches_it_was_fitted_on_white():
    layer = PatchWhitening(3, 2, eps=1e-6)
    photos = normalised_photos()
    layer.fit(photos)
    assert layer.out_channels == 24 and not layer.weight.requires_grad
    weight = layer.weight.reshape(24, -1)
    assert torch.allclose(weight[12:], -weight[:12])  # each filter and its negative
    white = layer.patches(photos) @ weight[:12].T  # (patches, 12)
    second_moments = white.T @ white / len(white)  # uncentred, as airbench's
    assert torch.allclose(second_moments, torch.eye(12), atol=1e-3)
    as_conv = layer(photos)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    assert torch.allclose(as_conv, white, atol=1e-4)  # the conv computes exactly those


def test_the_whitening_eps_damps_the_weakest_components():
    photos = normalised_photos()
    sharp, damped = PatchWhitening(3, 2, eps=1e-6), PatchWhitening(3, 2, eps=1.0)
    sharp.fit(photos)
    damped.fit(photos)
    assert damped.weight.norm() < sharp.weight.norm()


def test_dirac_init_makes_each_conv_pass_its_input_channels_through():
    net = build("seed_cnn", 3, widths=[4, 8], batch_norm=True, dirac=True)
    second = [m for m in net.features if isinstance(m, nn.Conv2d)][1]  # 4 -> 8 channels
    x = torch.randn(2, 4, 16, 16)
    assert torch.allclose(second(x)[:, :4], x, atol=1e-6)
    assert not torch.allclose(second(x)[:, 4:], torch.zeros(2, 4, 16, 16))  # the rest random


def test_frozen_norm_scales_stay_out_of_the_optimizer_and_norm_biases_get_their_lr():
    cfg = train.TrainConfig(data="d", arch="seed_cnn", arch_args=FAST_NET, lr=0.1,
                            norm_lr_scale=64)  # fmt: skip
    net = build("seed_cnn", 3, **FAST_NET)
    groups = param_groups(net, cfg)
    optimised = {id(p) for group in groups for p in group["params"]}
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(id(m.weight) not in optimised for m in norms)
    assert id(net.features[0].weight) not in optimised  # the whitening filters
    bias_group = next(g for g in groups if id(norms[0].bias) in {id(p) for p in g["params"]})
    assert bias_group["lr"] == pytest.approx(6.4) and bias_group["weight_decay"] == 0
    assert {id(p) for p in bias_group["params"]} == {id(m.bias) for m in norms}


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        build("seed_cnn", 3, widths=[4], activation="swish")


# ---- lookahead


def test_lookahead_pulls_the_weights_back_to_their_slow_average_every_n_steps():
    net = nn.Linear(2, 1)
    lookahead = Lookahead(net, every=2, base=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight += 1.0
    lookahead.step(net, 1, 10)  # not a multiple of 2: untouched
    assert torch.allclose(net.weight, start + 1)
    lookahead.step(net, 2, 10)
    decay = 0.9**2 * 0.2**3
    assert lookahead.decay(2, 10) == pytest.approx(decay)
    expected = decay * start + (1 - decay) * (start + 1)
    assert torch.allclose(net.weight, expected) and torch.allclose(
        lookahead.slow["weight"], expected
    )


def test_lookahead_ends_the_run_at_the_slow_weights_and_round_trips_its_state():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    lookahead = Lookahead(net, every=5, base=0.95)
    slow = {k: v.clone() for k, v in lookahead.slow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p += 3.0
    lookahead.step(net, 10, 10)  # the last step: decay 1, the network becomes the slow weights
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, slow[name])
    other = Lookahead(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), every=5, base=0.95)
    other.load_state_dict(lookahead.state_dict())
    assert all(torch.equal(other.slow[k], lookahead.slow[k]) for k in slow)
    assert "1.num_batches_tracked" not in lookahead.slow


# ---- alternating flips


def test_alternating_flips_mirror_every_photo_in_exactly_one_of_two_epochs(square_photos, tmp_path):
    cfg = fast_config(square_photos, tmp_path)
    spec, cache = train.prepare_data(cfg, _quiet())
    batches = TrainBatches(spec, cache, cfg, Dist())
    index = torch.arange(len(spec.train))
    even, odd = batches.flips(index, 0), batches.flips(index, 1)
    assert torch.equal(even, ~odd) and torch.equal(even, batches.flips(index, 2))
    assert 0.2 < even.float().mean() < 0.8  # a random half first


def test_augment_batch_mirrors_exactly_the_photos_it_is_told_to():
    from model.data import augment_batch
    from model.preprocess import Preprocess

    pre = Preprocess(32, 32)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    aug = Augment(random_resized_crop=False, color_jitter=0, translate=0.0)
    flips = torch.tensor([True, False, True, False])
    out = augment_batch(images, pre, aug, flips)
    plain = augment_batch(images, pre, Augment(random_resized_crop=False, color_jitter=0,
                                               hflip=False))  # fmt: skip
    assert torch.equal(out[flips], plain[flips].flip(-1)) and torch.equal(
        out[~flips], plain[~flips]
    )


def test_alternating_flips_need_the_batched_augmentation():
    with pytest.raises(ConfigError, match="alternate-flip"):
        train.TrainConfig(data="d", augment=Augment(alternate_flip=True))  # random-resized-crop
    with pytest.raises(ConfigError, match="tta-shift"):
        train.TrainConfig(data="d", tta_shift=True)


# ---- TTA


def test_tta_averages_exactly_the_views_airbench_does():
    net = build("seed_cnn", 3, widths=[4, 8], hidden=[]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = net(x)
        mirror = (net(x) + net(x.flip(-1))) / 2
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :32, :32], padded[..., 2:, 2:]]
        views = [(net(v) + net(v.flip(-1))) / 2 for v in shifted]
        six = mirror / 2 + (views[0] + views[1]) / 4
        assert torch.allclose(TTA().logits(net, x), plain)
        assert torch.allclose(TTA(flip=True).logits(net, x), mirror)
        assert torch.allclose(TTA(flip=True, shift=True).logits(net, x), six, atol=1e-6)


def test_tta_leaves_a_mirror_symmetric_network_on_a_symmetric_photo_unchanged():
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    x = torch.randn(1, 3, 8, 4)
    x = torch.cat([x, x.flip(-1)], -1)  # a mirror-symmetric photo
    with torch.no_grad():
        assert torch.allclose(TTA(flip=True).logits(net, x), net(x), atol=1e-6)


# ---- a run with every technique


def test_a_run_with_the_whole_recipe_resumes_exactly(square_photos, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    trainer = train.train(fast_config(square_photos, whole))
    first = trainer.net.features[0]
    assert first.weight.abs().sum() > 0 and not first.weight.requires_grad  # fitted, frozen
    assert not first.bias.requires_grad  # frozen after whiten_bias_epochs
    with pytest.raises(Interrupted):
        train.train(fast_config(square_photos, cut), on_epoch_end=stop_after(2))
    train.train(resume=cut)
    assert_same_tensors(whole / "last.safetensors", cut / "last.safetensors")
    assert history(whole) == history(cut)
    tta = json.loads((whole / "val_tta_evaluation.json").read_text())["source"]
    assert tta["tta_flip"] and tta["tta_shift"]
    assert checkpoint.load(whole / "best.safetensors").card.tta == "none"  # measured, not served


def test_a_served_tta_is_in_the_card_and_the_server_applies_it(square_photos, tmp_path):
    train.train(fast_config(square_photos, tmp_path, epochs=1, serve_tta=True))
    best = checkpoint.load(tmp_path / "best.safetensors")
    assert best.card.tta == "flip_shift" and best.card.arch_args["whiten"] == 2
    source = json.loads((tmp_path / "val_evaluation.json").read_text())["source"]
    assert source["tta_shift"] and not (tmp_path / "val_tta_evaluation.json").exists()
    tagger = Tagger.load(tmp_path / "best.safetensors", RuntimeChoice.resolve("cpu", "torch"))
    pixels = torch.stack([tagger.pixels(photo_bytes((32, 32), c)) for c in COLORS.values()])
    net = best.build_model("cpu")
    with torch.no_grad():
        logits = TTA(flip=True, shift=True).logits(net, normalize(pixels, best.card.preprocess))
    expected = torch.softmax(logits / best.card.temperature, 1)
    assert torch.allclose(tagger.probabilities(pixels), expected, atol=1e-5)
    # phototag evaluate applies the card's TTA too: the run's numbers, number for number
    args = ["--checkpoint", tmp_path / "best.safetensors", "--data", square_photos]
    args += ["--split", "val", "--val-fraction", "0.2", "--workers", "0", "--out", tmp_path / "e"]
    assert evaluate.main([str(a) for a in args]) == 0
    cli = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    run = json.loads((tmp_path / "val_evaluation.json").read_text())
    assert cli.pop("source")["tta_shift"] and run.pop("source")["tta_shift"]
    assert cli == run


def test_the_whitening_bias_trains_for_its_epochs_then_stays(square_photos, tmp_path):
    cfg = fast_config(square_photos, tmp_path, epochs=4, whiten_bias_epochs=2, lookahead_every=0)
    trainer = train.Trainer(cfg, Dist(), _quiet())
    biases = []
    trainer.fit(lambda epoch: biases.append(trainer.net.features[0].bias.detach().clone()))
    assert not torch.equal(biases[0], torch.zeros(24))  # trained in epochs 1 and 2
    assert not torch.equal(biases[0], biases[1])
    assert torch.equal(biases[1], biases[2]) and torch.equal(biases[2], biases[3])  # then frozen


def test_cpu_mixed_precision_trains_in_bfloat16_with_channels_last(square_photos, tmp_path):
    trainer = train.train(fast_config(square_photos, tmp_path, epochs=1, cpu_amp=True))
    assert trainer.amp and trainer.net.features[2].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert torch.isfinite(torch.tensor(trainer.progress.history[-1]["val_loss"]))


def _quiet():
    from model.training.processes import Log

    return Log(Dist())


def test_whitening_is_fitted_only_on_training_photos(square_photos, tmp_path):
    trainer = train.Trainer(fast_config(square_photos, tmp_path), Dist(), _quiet())
    photos = trainer.whitening_photos()
    assert len(photos) == len(trainer.spec.train)
    refit = PatchWhitening(3, 2)
    refit.fit(photos)
    assert torch.allclose(refit.weight, trainer.net.features[0].weight)
    assert architectures.PatchWhitening is PatchWhitening


def test_the_recipe_network_is_explained_on_its_last_3x3_map():
    from model.explain import feature_layer

    net = build("seed_cnn", 10, **train_cifar10.NET)
    name = feature_layer(net, 32)
    layer = dict(net.named_modules())[name]
    assert isinstance(layer, nn.GELU)  # the last block's activation, before the global max-pool
    assert isinstance(net.features[int(name.split(".")[1]) + 1], nn.AdaptiveMaxPool2d)


def test_alternating_flips_refuse_photos_that_cannot_be_batched(tmp_path):
    photos = write_photo_folder(tmp_path / "mixed", 4)  # widths vary: no one-size stack
    cfg = fast_config(photos, tmp_path / "run", resize=40, crop=32)
    with pytest.raises(ConfigError, match="alternate-flip"):
        train.train(cfg)
