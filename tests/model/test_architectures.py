from pathlib import Path

import pytest
import torch
import torchvision

from model import architectures
from model.architectures import (
    UnknownArchitectureError,
    build,
    conv_output_size,
    load_backbone_weights,
    seed_cnn_feature_shape,
)

TORCHVISION_ARCHS = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [
        (32, 3, 1, 1, 32),  # "same" 3x3 conv
        (32, 2, 2, 0, 16),  # 2x2 max-pool, stride 2
        (227, 11, 4, 0, 55),  # AlexNet's first layer: (227 - 11 + 0)/4 + 1
        (224, 7, 2, 3, 112),  # ResNet stem: (224 - 7 + 6)/2 + 1, floored
        (5, 5, 1, 0, 1),
        (7, 3, 2, 0, 3),
    ],
)
def test_conv_output_size_follows_the_formula(size, kernel, stride, padding, expected):
    assert conv_output_size(size, kernel, stride, padding) == expected


def test_conv_output_size_refuses_a_window_larger_than_the_input():
    with pytest.raises(ValueError, match="does not fit"):
        conv_output_size(4, 7, 1, 0)


@pytest.mark.parametrize(
    "config",
    [
        {"input_size": 32, "widths": [8, 16]},
        {"input_size": 32, "widths": [8, 16, 32], "convs_per_block": 2, "batch_norm": True},
        {"input_size": 64, "widths": [4, 8], "kernel_sizes": [5, 3], "paddings": [2, 0]},
        {"input_size": 96, "widths": [6, 12], "strides": [2, 1], "pool_size": 3, "pool_stride": 2},
        {"input_size": 28, "widths": [4], "kernel_sizes": 5, "paddings": 0, "hidden": []},
    ],
)
def test_seed_cnn_flatten_width_matches_the_arithmetic(config):
    net = build("seed_cnn", 7, **config)
    arithmetic_keys = ("widths", "kernel_sizes", "strides", "paddings", "pool_size",
                       "pool_stride", "convs_per_block")  # fmt: skip
    c, h, w = seed_cnn_feature_shape(
        config["input_size"], **{k: v for k, v in config.items() if k in arithmetic_keys}
    )
    conv_part = net.features[: [type(m) for m in net.features].index(torch.nn.Flatten)]
    x = torch.zeros(2, 3, config["input_size"], config["input_size"])
    assert tuple(conv_part(x).shape) == (2, c, h, w)
    assert tuple(net(x).shape) == (2, 7)


def test_seed_cnn_is_conv_relu_pool_then_fully_connected_with_dropout():
    net = build("seed_cnn", 10, input_size=32, widths=[8, 16], hidden=[32], dropout=0.3)
    kinds = [type(m).__name__ for m in net.features]
    assert kinds[:6] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d"]
    assert kinds[6:] == ["Flatten", "Dropout", "Linear", "ReLU"]
    assert [type(m).__name__ for m in net.head] == ["Dropout", "Linear"]
    assert net.head[0].p == 0.3
    assert net.num_classes == 10


def test_seed_cnn_rejects_per_block_lists_of_the_wrong_length():
    with pytest.raises(ValueError, match="kernel_sizes has 1 entries"):
        build("seed_cnn", 2, widths=[4, 8], kernel_sizes=[3])


def test_registry_refuses_unknown_and_duplicate_names():
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'nope'"):
        build("nope", 3)
    with pytest.raises(ValueError, match="already registered"):
        architectures.register("seed_cnn")(lambda n: None)
    expected = {"seed_cnn", "efficientnet_lite0", "efficientnet_lite2", *TORCHVISION_ARCHS}
    assert expected <= set(architectures.available())


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_backbones_get_a_new_head(arch):
    net = build(arch, 4).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 96, 96))
    assert tuple(out.shape) == (1, 4)
    assert isinstance(net.head[-1], torch.nn.Linear) and net.head[-1].out_features == 4


def test_torchvision_backbone_initialises_from_a_local_weights_file(tmp_path: Path):
    original = torchvision.models.resnet18(weights=None)  # stands in for a downloaded .pth
    torch.save(original.state_dict(), tmp_path / "resnet18.pth")
    net = build("resnet18", 3, weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(net.features.conv1.weight, original.conv1.weight)
    assert torch.equal(net.features.layer4[1].bn2.running_var, original.layer4[1].bn2.running_var)


def test_load_backbone_weights_reports_what_it_left_out_and_refuses_a_wrong_backbone():
    source = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    net = build("mobilenet_v3_small", 2)
    left_out = load_backbone_weights(net, source)
    assert left_out == ["classifier.3.weight", "classifier.3.bias"]
    with pytest.raises(ValueError, match="do not fit this backbone"):
        load_backbone_weights(build("resnet18", 2), source)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_lite_key_map_covers_every_shipped_tensor(variant):
    path = getattr(architectures, f"shipped_{variant}_weights_path")()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    renamed = getattr(architectures, f"load_shipped_{variant}")()
    ours = build(f"efficientnet_{variant}", 1000).state_dict()
    assert set(renamed) == set(ours)
    assert len(renamed) == len(shipped)
    assert all(renamed[k].shape == ours[k].shape for k in ours)
    assert torch.equal(architectures.read_weights(path)["head.1.weight"], shipped["_fc.weight"])


def test_same_padding_matches_tensorflow_output_sizes():
    conv = architectures.SamePadConv2d(1, 1, 3, 2, bias=False)
    for size in (224, 225, 7, 8):
        out = conv(torch.zeros(1, 1, size, size))
        assert out.shape[-1] == -(-size // 2)  # ceil(size / stride)


def test_the_mean_pooled_feature_comes_from_the_last_batchnorm():
    """BatchNorm -> ReLU -> average pool: each channel's mean is E[relu(z)], z ~ N(bias,
    weight^2) over the photos it was trained on, m * Phi(m / s) + s * phi(m / s)."""
    norm = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([-1.0, 0.0, 2.0]))
        norm.weight.copy_(torch.tensor([0.5, 1.0, -3.0]))  # the sign does not matter
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), norm, torch.nn.ReLU())
    net = architectures.TaggerNet(
        torch.nn.Sequential(block, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 3, 2, 0.0
    )
    m, s = norm.bias.detach(), norm.weight.detach().abs()
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = m * normal.cdf(m / s) + s * normal.log_prob(m / s).exp()
    torch.testing.assert_close(architectures.pooled_feature_mean(net), expected, atol=1e-4, rtol=0)
    lite = build("efficientnet_lite2", 5)
    assert architectures.pooled_feature_mean(lite).shape == (1280,)


@pytest.mark.parametrize("arch", ["resnet18", "seed_cnn"])
def test_no_mean_pooled_feature_where_the_features_do_not_end_in_batchnorm(arch):
    """A ResNet ends in a residual sum, seed_cnn in fully-connected layers."""
    assert architectures.pooled_feature_mean(build(arch, 3)) is None


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_the_mean_mid_level_feature_comes_from_the_batchnorms_it_sums(arch):
    """In training mode each BatchNorm's output has its bias as the batch mean, so the
    mid-level features of a batch average to what the biases say, residual sums included."""
    torch.manual_seed(0)
    net = build(arch, 5)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.normal_()
    logits, features, mid = net.train().outputs(torch.randn(8, 3, 64, 64))
    torch.testing.assert_close(mid.mean(0), architectures.mid_level_mean(net), atol=1e-4, rtol=0)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    logits, features, mid = net.outputs(x)
    torch.testing.assert_close(logits, net(x))
    torch.testing.assert_close(features, net.features(x))
    assert mid.shape == (2, net.features[1][-1].expand[0].in_channels)


@pytest.mark.parametrize("arch", ["resnet18", "seed_cnn"])
def test_no_mid_level_features_where_the_network_is_not_efficientnet_lite(arch):
    net = build(arch, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, _, mid = net.outputs(x)
    assert mid.shape == (2, 0) and architectures.mid_level_mean(net) is None
    torch.testing.assert_close(logits, net(x))
