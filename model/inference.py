"""Make a trained network cheaper to run for inference, without changing what it computes."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with every BatchNorm2d that directly follows a Conv2d inside a
    ``Sequential`` folded into that convolution's weights and bias (the BatchNorm becomes an
    Identity). In eval mode a BatchNorm is a fixed per-channel affine map, so the outputs are
    the same up to float rounding, and one memory pass per folded layer is saved: on a CPU,
    where these small networks are memory-bound, that is a large share of the time."""
    folded = copy.deepcopy(net).eval()
    _fold_in_place(folded)
    return folded


def _fold_in_place(module: nn.Module) -> None:
    for child in module.children():
        if isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                conv, norm = child[i], child[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    child[i] = fuse_conv_bn_eval(conv, norm)
                    child[i + 1] = nn.Identity()
        _fold_in_place(child)
