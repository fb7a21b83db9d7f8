import pytest
import torch
from torch import nn

from model.architectures import build
from model.inference import fold_batchnorm


def randomise_batchnorm_statistics(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize(
    ("arch", "args", "size"),
    [
        ("efficientnet_lite0", {}, 64),
        ("seed_cnn", {"input_size": 32, "widths": [4, 8], "convs_per_block": 2,
                      "batch_norm": True}, 32),
        ("resnet18", {}, 64),
    ],
)  # fmt: skip
def test_folding_batchnorm_keeps_the_outputs(arch, args, size):
    torch.manual_seed(0)
    net = build(arch, 5, **args).eval()
    randomise_batchnorm_statistics(net)
    folded = fold_batchnorm(net)
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        assert torch.allclose(folded(x), net(x), atol=1e-4, rtol=1e-4)
    remaining = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    if arch != "resnet18":  # torchvision's ResNet keeps conv and bn as attributes, not in order
        assert remaining == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
