"""YuNet, libfacedetection's face detector (Wu, Peng, Yu, "YuNet: A Tiny Millisecond-level Face
Detector", 2023), in PyTorch.

A tiny anchor-free detector: a backbone of depthwise-separable units (a 1x1 convolution, then a
depthwise 3x3, then ReLU), a top-down neck over strides 8, 16 and 32, and at each stride four
heads: face logit (cls), objectness logit (obj), box (bbox) and five landmarks (kps). Each cell of
a level is one prior, the grid point ``(col * stride, row * stride)``. The weights are
libfacedetection's (3-clause BSD), converted once by ``tools/convert_yunet_weights.py`` into
``model/weights/yunet.safetensors``; the network's layers and the decoding follow the library's
``src/facedetectcnn-model.cpp`` and ``facedetectcnn.cpp`` (commit acf7b25, 2023).

What the network expects (checked against the library's own build, the ``yuface`` wheel):
BGR channel order, values 0..255 as floats with no mean or scale, and height and width multiples
of 32, the photo in the top-left corner and zeros below and to the right of it.

Usage::

    net = load_yunet()
    prepared = prepare_input(rgb_image, work_size=640)
    with torch.inference_mode():
        faces = decode(net(network_input(prepared.pixels)), prepared.padded)[0]
    faces = to_original(faces, prepared.scale)  # (K, 15) rows in the photo's pixels
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "weights" / "yunet.safetensors"

STRIDES = (8, 16, 32)
PAD_MULTIPLE = 32  # the coarsest stride: every level's grid then tiles the input exactly
HEADS = ("cls", "obj", "bbox", "kps")
# forward's outputs, in order: the four heads at stride 8, then at 16, then at 32
OUTPUT_NAMES = tuple(f"{head}_{stride}" for stride in STRIDES for head in HEADS)

# The library's defaults, as the yuface wheel runs it (facedetectcnn-model.cpp:
# detection_output(cls, reg, kps, obj, 0.45f, 0.2f, 1000, 512); an earlier 2023 revision had 0.3,
# 0.5, 1000, 100): lowest score kept, IoU above which NMS drops the weaker box, candidates kept
# before NMS, faces kept after it. yuface.detect then keeps scores above 0.5 by default; 0.2 keeps
# many non-faces, a tagger wants 0.5 to 0.7
SCORE_THRESHOLD = 0.2
NMS_IOU = 0.45
TOP_K = 1000
KEEP_TOP_K = 512

# Columns of a decoded face row: box, score, then five landmarks as (x, y), in the order the
# library gives them: the person's right eye (left in the photo), left eye, nose tip, right mouth
# corner, left mouth corner
FACE_COLUMNS = (
    "x0", "y0", "x1", "y1", "score",
    "right_eye_x", "right_eye_y", "left_eye_x", "left_eye_y", "nose_x", "nose_y",
    "mouth_right_x", "mouth_right_y", "mouth_left_x", "mouth_left_y",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The network; attribute names are the weights file's keys
# --------------------------------------------------------------------------------------------


class DepthwiseSeparable(nn.Module):
    """1x1 convolution (channel mixing, no activation), then depthwise 3x3, then ReLU unless it
    feeds a head."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        super().__init__()
        self.pw = nn.Conv2d(in_channels, out_channels, 1)
        self.dw = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.pw(x))
        return F.relu(x) if self.relu else x


class Stem(nn.Module):
    """3x3 stride-2 convolution with ReLU, then one depthwise-separable unit: (B, 3, H, W) ->
    (B, 16, H/2, W/2)."""

    def __init__(self) -> None:
        super().__init__()
        # "pw" after the weights' name: the library runs this 3x3 convolution as a 1x1 one over
        # the 27 pixel values of each 3x3 window (padded to 32 channels)
        self.pw = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dp = DepthwiseSeparable(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dp(F.relu(self.pw(x)))


class Block(nn.Module):
    """Two depthwise-separable units, the second one changing the channel count."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.dp1 = DepthwiseSeparable(in_channels, in_channels)
        self.dp2 = DepthwiseSeparable(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dp2(self.dp1(x))


class Backbone(nn.Module):
    """(B, 3, H, W) -> features (B, 64, H/s, W/s) at strides 8, 16 and 32."""

    def __init__(self) -> None:
        super().__init__()
        self.model0 = Stem()
        self.model1 = Block(16, 32)
        self.model2 = Block(32, 64)
        self.model3 = Block(64, 64)
        self.model4 = Block(64, 64)
        self.model5 = Block(64, 64)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool(self.model0(x))  # (B, 16, H/4, W/4)
        x = self.model2(self.model1(x))  # (B, 64, H/4, W/4)
        c3 = self.model3(self.pool(x))  # (B, 64, H/8, W/8)
        c4 = self.model4(self.pool(c3))  # (B, 64, H/16, W/16)
        c5 = self.model5(self.pool(c4))  # (B, 64, H/32, W/32)
        return c3, c4, c5


class Neck(nn.Module):
    """Top-down: each level is the level above (after its own unit), upsampled 2x (nearest), plus
    the backbone's feature, then a depthwise-separable unit."""

    def __init__(self) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(DepthwiseSeparable(64, 64) for _ in STRIDES)

    def forward(
        self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p5 = self.lateral_convs[2](c5)
        p4 = self.lateral_convs[1](c4 + F.interpolate(p5, scale_factor=2.0, mode="nearest"))
        p3 = self.lateral_convs[0](c3 + F.interpolate(p4, scale_factor=2.0, mode="nearest"))
        return p3, p4, p5


class Head(nn.Module):
    """Per level, four depthwise-separable units without ReLU: cls (1), obj (1), bbox (4: centre
    offset dx, dy in strides, then log width and height in strides) and kps (10: five (dx, dy)
    offsets in strides)."""

    def __init__(self) -> None:
        super().__init__()
        self.multi_level_cls = nn.ModuleList(DepthwiseSeparable(64, 1, False) for _ in STRIDES)
        self.multi_level_obj = nn.ModuleList(DepthwiseSeparable(64, 1, False) for _ in STRIDES)
        self.multi_level_bbox = nn.ModuleList(DepthwiseSeparable(64, 4, False) for _ in STRIDES)
        self.multi_level_kps = nn.ModuleList(DepthwiseSeparable(64, 10, False) for _ in STRIDES)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        heads = (self.multi_level_cls, self.multi_level_obj, self.multi_level_bbox)
        maps: list[torch.Tensor] = []
        for level, x in enumerate(features):
            maps += [head[level](x) for head in heads]
            maps.append(self.multi_level_kps[level](x))
        return tuple(maps)


class YuNet(nn.Module):
    """The network: BGR 0..255 pixels (B, 3, H, W), H and W multiples of 32 -> 12 raw maps, for
    strides 8, 16, 32 in turn: cls (B, 1, h, w), obj (B, 1, h, w), bbox (B, 4, h, w), kps
    (B, 10, h, w), with h, w = H / stride, W / stride (names in ``OUTPUT_NAMES``). No
    data-dependent control flow: it traces, and OpenVINO converts it as it is. Give it
    channels-last input (:func:`network_input` does): torch's CPU convolutions then run 1.5-2x
    faster."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.bbox_head = Head()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.bbox_head(self.neck(*self.backbone(x)))


def load_yunet(path: str | Path | None = None) -> YuNet:
    """The network with the weights in ``path`` (default: the shipped file), in eval mode."""
    net = YuNet()
    net.load_state_dict(load_file(str(path or WEIGHTS_PATH)), strict=True)
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Raw maps -> faces
# --------------------------------------------------------------------------------------------


def candidates(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every prior of every level decoded, before any threshold: (B, N, 15) rows laid out as
    ``FACE_COLUMNS``, in the input's pixels; N = sum of h * w over the levels, stride 8 first,
    row-major within a level (the library's order)."""
    if len(maps) != len(OUTPUT_NAMES):
        raise ValueError(f"expected {len(OUTPUT_NAMES)} maps ({OUTPUT_NAMES}), got {len(maps)}")
    rows = []
    for level, stride in enumerate(STRIDES):
        cls, obj, bbox, kps = maps[4 * level : 4 * level + 4]
        batch, _, height, width = cls.shape
        ys = torch.arange(height, dtype=bbox.dtype, device=bbox.device) * stride
        xs = torch.arange(width, dtype=bbox.dtype, device=bbox.device) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        priors = torch.stack([grid_x, grid_y], -1).reshape(1, height * width, 1, 2)  # (1, N, 1, 2)
        score = (cls.sigmoid() * obj.sigmoid()).sqrt().reshape(batch, -1, 1)  # (B, N, 1)
        bbox = bbox.flatten(2).transpose(1, 2)  # (B, N, 4)
        centre = priors[:, :, 0] + bbox[..., :2] * stride
        half = bbox[..., 2:].exp() * (stride / 2)
        points = kps.flatten(2).transpose(1, 2).reshape(batch, -1, 5, 2) * stride + priors
        rows.append(torch.cat([centre - half, centre + half, score, points.flatten(2)], -1))
    return torch.cat(rows, 1)


def decode(
    maps: Sequence[torch.Tensor],
    input_size: Sequence[int],
    score_threshold: float = SCORE_THRESHOLD,
    nms_iou: float = NMS_IOU,
    top_k: int = TOP_K,
    keep_top_k: int = KEEP_TOP_K,
) -> list[torch.Tensor]:
    """YuNet's raw maps for a batch and the (height, width) of the padded input -> per image, its
    faces as (K, 15) rows (``FACE_COLUMNS``: x0, y0, x1, y1, score, then the five landmarks' x,
    y), best first, in the input's pixels.

    As the library does: score = sqrt(sigmoid(cls) * sigmoid(obj)); rows with score below
    ``score_threshold`` dropped; the ``top_k`` best kept; greedy NMS dropping boxes whose IoU
    with a better one exceeds ``nms_iou``; at most ``keep_top_k`` faces."""
    height, width = (int(s) for s in input_size)
    for stride, cls in zip(STRIDES, maps[::4], strict=True):
        if (cls.shape[-2] * stride, cls.shape[-1] * stride) != (height, width):
            raise ValueError(
                f"maps of size {tuple(cls.shape[-2:])} at stride {stride} do not come from an "
                f"input of {height}x{width}"
            )
    faces = []
    for rows in candidates(maps):  # (N, 15) per image
        rows = rows[rows[:, 4] >= score_threshold]
        order = rows[:, 4].argsort(descending=True, stable=True)[:top_k]
        rows = rows[order]
        keep = nms(rows[:, :4], rows[:, 4], nms_iou)[:keep_top_k]
        faces.append(rows[keep])
    return faces


def to_original(faces: torch.Tensor, scale: Sequence[float]) -> torch.Tensor:
    """Face rows (K, 15) in working pixels -> the same rows in the photo's pixels, ``scale``
    being ``Prepared.scale`` (photo pixels per working pixel, x then y)."""
    factors = faces.new_ones(faces.shape[-1])
    factors[0:4:2] = scale[0]
    factors[1:4:2] = scale[1]
    factors[5::2] = scale[0]
    factors[6::2] = scale[1]
    return faces * factors


# --------------------------------------------------------------------------------------------
# Photo -> input
# --------------------------------------------------------------------------------------------


REDUCING_GAP = 2.0  # a box reduce first while the photo is at least this many times too large


class Prepared(NamedTuple):
    pixels: torch.Tensor  # (1, H, W, 3) uint8 RGB, H, W multiples of 32 (:func:`network_input`)
    size: tuple[int, int]  # (width, height) of the working image, top-left in ``pixels``
    scale: tuple[float, float]  # photo pixels per working pixel, x and y

    @property
    def padded(self) -> tuple[int, int]:
        """(height, width) of ``pixels``: what :func:`decode` needs."""
        return (self.pixels.shape[1], self.pixels.shape[2])


def network_input(pixels: torch.Tensor) -> torch.Tensor:
    """Prepared pixels (B, H, W, 3) uint8 RGB -> what :class:`YuNet` reads: (B, 3, H, W)
    float32 BGR 0..255, channels-last. (OpenVINO does the same inside its compiled graph.)"""
    return pixels.flip(-1).permute(0, 3, 1, 2).float()


def working_pixels(image: Image.Image, work_size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3), longest side at most ``work_size`` (downscaled only: upscaling finds
    no new faces worth its cost). PIL's bilinear resize with ``reducing_gap=2`` within one level,
    in a fraction of its time (bench/README.md): a photo more than twice too large is first
    box-reduced by an integer factor (PIL's ``reduce``), then torch's antialiased bilinear on
    uint8 maps the reduced photo's exact extent (a partial last box included) onto the size."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    scale = work_size / max(width, height)
    if scale >= 1:
        return torch.from_numpy(np.array(image))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    factor = max(1, int(1 / (scale * REDUCING_GAP)))
    if factor >= 2:
        image = image.reduce(factor)
    planes = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # (1, 3, H, W), a view
    scales = (size[0] * factor / height, size[1] * factor / width)
    resized = F.interpolate(planes, scale_factor=scales, mode="bilinear", antialias=True,
                            align_corners=False, recompute_scale_factor=False)  # fmt: skip
    if tuple(resized.shape[-2:]) != size:  # float rounding of a scale: the size, as asked
        resized = F.interpolate(planes, size=size, mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0)


def prepare_input(image: Image.Image, work_size: int = 640) -> Prepared:
    """A photo (PIL, any mode) -> YuNet's input at ``work_size`` (longest side), zero-padded
    below and to the right to multiples of 32, with the scale back to the photo's pixels."""
    work = working_pixels(image, work_size)
    height, width = work.shape[:2]
    padded_h = -(-height // PAD_MULTIPLE) * PAD_MULTIPLE
    padded_w = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    pixels = torch.zeros((1, padded_h, padded_w, 3), dtype=torch.uint8)
    pixels[0, :height, :width] = work
    scale = (image.width / width, image.height / height)
    return Prepared(pixels, (width, height), scale)
