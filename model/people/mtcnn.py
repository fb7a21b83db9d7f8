"""People tags from faces: an MTCNN face detector and the rules that turn its faces into
``person``, ``portrait`` and ``group``.

ImageNet-1k has no person class, but a face is a sign of a person that a small offline network
finds well. MTCNN is a cascade of three small networks: P-Net proposes face windows over an
image pyramid, R-Net rejects most of them on 24x24 crops and O-Net decides on 48x48 crops; each
stage also nudges the boxes (bounding-box regression). The weights are facenet-pytorch's (MIT),
converted once by ``tools/convert_mtcnn_weights.py`` into ``model/weights/mtcnn.safetensors``.

Usage::

    detector = FaceDetector.load()
    faces = detector.detect(rgb_image)
    tags = people_tags(faces, rgb_image.size)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_area, nms, roi_align

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "weights" / "mtcnn.safetensors"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float  # the detector's confidence, 0..1

    @property
    def side(self) -> float:
        """The face's size in pixels: the side of the square of the box's area."""
        x0, y0, x1, y1 = self.box
        return math.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))


@dataclass(frozen=True)
class PeopleTag:
    label: str  # "person", "portrait" or "group"
    probability: float  # 0..1


@dataclass(frozen=True)
class Detection:
    """What one run of the detector found, and how much of the photo it looked at."""

    faces: list[Face]
    work_size: tuple[int, int]  # (width, height) of the image the networks saw
    proposals: int  # P-Net windows sent to R-Net
    refined: int  # R-Net boxes sent to O-Net


# --------------------------------------------------------------------------------------------
# The three networks; attribute names are the weights file's keys
# --------------------------------------------------------------------------------------------


def _flatten_wh_c(x: torch.Tensor) -> torch.Tensor:
    # the dense layers were trained (in Caffe, then TF) on features flattened width-major:
    # (B, C, H, W) -> (B, W, H, C) -> (B, W*H*C)
    return x.transpose(1, 3).flatten(1)


class PNet(nn.Module):
    """Proposal net, fully convolutional: a 12x12 window every 2 px -> face logits (B, 2, h, w)
    and box offsets (B, 4, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x), self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net: 24x24 crops (B, 3, 24, 24) -> face logits (B, 2), box offsets (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))  # (B, 64, 3, 3)
        x = self.prelu4(self.dense4(_flatten_wh_c(x)))
        return self.dense5_1(x), self.dense5_2(x)


class ONet(nn.Module):
    """Output net: 48x48 crops (B, 3, 48, 48) -> face logits (B, 2), box offsets (B, 4) and five
    landmarks (B, 10: x then y, as fractions of the box), which phototag does not use yet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))  # (B, 128, 3, 3)
        x = self.prelu5(self.dense5(_flatten_wh_c(x)))
        return self.dense6_1(x), self.dense6_2(x), self.dense6_3(x)


class MTCNNNets(nn.Module):
    """The three networks together; their state dict is the weights file."""

    def __init__(self) -> None:
        super().__init__()
        self.pnet = PNet()
        self.rnet = RNet()
        self.onet = ONet()


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorConfig:
    """How hard the detector looks. Sizes are in working pixels (after the downscale)."""

    work_size: int = 640  # longest side the networks see; larger photos are downscaled first
    min_face: int = 20  # smallest face side searched for; P-Net's first level maps it to 12 px
    # P-, R-, O-Net face probabilities. MTCNN's usual ones are (0.6, 0.7, 0.7); here P-Net's 0.7
    # sends a third fewer windows to R-Net and found the same faces, and O-Net's 0.92 is the
    # lowest at which none of our faceless photos got a face (bench/README.md)
    thresholds: tuple[float, float, float] = (0.7, 0.7, 0.92)
    pyramid_factor: float = 0.709  # side ratio of successive pyramid levels (area halves)
    max_proposals: int = 256  # best P-Net windows kept for R-Net: bounds the work on busy photos
    max_refined: int = 64  # best R-Net boxes kept for O-Net

    def __post_init__(self) -> None:
        if self.min_face < 12 or self.work_size < self.min_face:
            raise ValueError(f"need 12 <= min_face <= work_size, got {self}")
        if not 0 < self.pyramid_factor < 1:
            raise ValueError(f"pyramid_factor must lie in (0, 1), got {self.pyramid_factor}")
        if not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds are probabilities, got {self.thresholds}")


class FaceDetector:
    """MTCNN on one photo at a time. ``detect`` keeps no state between calls, so several threads
    may call it at once; it runs under ``torch.inference_mode`` and leaves torch's global
    settings (threads, grad mode) as they are."""

    def __init__(self, nets: MTCNNNets, config: DetectorConfig | None = None) -> None:
        self.nets = nets.eval().requires_grad_(False)
        self.config = config or DetectorConfig()

    @classmethod
    def load(
        cls, path: str | Path | None = None, config: DetectorConfig | None = None
    ) -> FaceDetector:
        """The detector with the weights in ``path`` (default: the shipped file)."""
        nets = MTCNNNets()
        nets.load_state_dict(load_file(str(path or WEIGHTS_PATH)), strict=True)
        return cls(nets, config)

    def detect(self, image: Image.Image) -> list[Face]:
        """The faces in an RGB image of any size, best first; boxes in the image's pixels."""
        return self.run(image).faces

    def run(self, image: Image.Image) -> Detection:
        """:meth:`detect`, with what it cost: the working size and the candidates per stage."""
        work = _working_image(image, self.config.work_size)
        with torch.inference_mode():
            pixels = _to_tensor(work)  # (1, 3, h, w), 0..255
            boxes, proposals, refined = self._cascade(pixels)
        scale_x = image.width / work.width
        scale_y = image.height / work.height
        faces = [
            Face(
                box=(x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y),
                score=score,
            )
            for x0, y0, x1, y1, score in boxes.tolist()
        ]
        return Detection(faces, work.size, proposals, refined)

    def _cascade(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(1, 3, h, w) pixels -> faces (K, 5: x0, y0, x1, y1, score) in working pixels, best
        first, with the number of boxes R-Net and O-Net looked at."""
        c = self.config
        height, width = pixels.shape[-2:]
        boxes = _propose(self.nets.pnet, pixels, c)[: c.max_proposals]
        proposals = len(boxes)
        boxes = _refine(self.nets.rnet, pixels, boxes, 24, c.thresholds[1])
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)][: c.max_refined]
        refined = len(boxes)
        boxes = _refine(self.nets.onet, pixels, _square(boxes), 48, c.thresholds[2])
        boxes = boxes[_suppress_nested(boxes, 0.7)]
        boxes[:, 0:4:2] = boxes[:, 0:4:2].clamp(0, width)
        boxes[:, 1:4:2] = boxes[:, 1:4:2].clamp(0, height)
        return boxes, proposals, refined


def _working_image(image: Image.Image, work_size: int) -> Image.Image:
    """RGB, longest side at most ``work_size`` (huge photos cost what a small one costs)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    scale = work_size / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a box reduce by an integer factor first, then bilinear: fast on 12 MP
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    # contiguous (N, C, H, W): roi_align and the pyramid would otherwise copy it on every call
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()[None].float()


def _net_input(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 pixels -> the range MTCNN was trained on, channels-last: with so few channels,
    torch's CPU convolutions and max-pools run 2-4x faster in that layout."""
    return ((pixels - 127.5) / 128.0).contiguous(memory_format=torch.channels_last)


def _pyramid(height: int, width: int, config: DetectorConfig) -> list[float]:
    """Scales at which P-Net's 12 px window covers faces from ``min_face`` up to the photo."""
    scale = 12 / config.min_face
    scales = []
    while min(height, width) * scale >= 12:
        scales.append(scale)
        scale *= config.pyramid_factor
    return scales


def _propose(pnet: PNet, pixels: torch.Tensor, config: DetectorConfig) -> torch.Tensor:
    """P-Net over the pyramid -> square candidate boxes (K, 5), best first."""
    height, width = pixels.shape[-2:]
    found = []
    level = pixels
    for scale in _pyramid(height, width, config):
        size = (math.ceil(height * scale), math.ceil(width * scale))
        # each level from the one before: area resampling costs what its input costs
        level = F.interpolate(level, size=size, mode="area")
        logits, offsets = pnet(_net_input(level))
        windows = _windows(logits[0], offsets[0], height / size[0], width / size[1], config)
        found.append(windows[nms(windows[:, :4], windows[:, 4], 0.5)])
    if not found:
        return pixels.new_zeros((0, 5))
    windows = torch.cat(found)
    windows = windows[nms(windows[:, :4], windows[:, 4], 0.7)]
    return _square(_regress(windows[:, :5], windows[:, 5:]))


def _windows(
    logits: torch.Tensor,
    offsets: torch.Tensor,
    step_y: float,
    step_x: float,
    config: DetectorConfig,
) -> torch.Tensor:
    """P-Net's map at one level -> windows above threshold (K, 9): box in working pixels,
    score, the four offsets. Output cell (i, j) is the 12x12 window at (2j, 2i) of the level."""
    score = logits.softmax(0)[1]  # (h, w)
    rows, cols = torch.nonzero(score >= config.thresholds[0], as_tuple=True)
    x0 = cols * 2 * step_x
    y0 = rows * 2 * step_y
    boxes = torch.stack([x0, y0, x0 + 12 * step_x, y0 + 12 * step_y], 1)
    return torch.cat([boxes, score[rows, cols, None], offsets[:, rows, cols].T], 1)


def _refine(
    net: nn.Module, pixels: torch.Tensor, boxes: torch.Tensor, size: int, threshold: float
) -> torch.Tensor:
    """Score and regress each box on its ``size`` x ``size`` crop; keep those above threshold,
    best first."""
    if len(boxes) == 0:
        return boxes
    logits, offsets, *_ = net(_net_input(_crops(pixels, boxes[:, :4], size)))
    score = logits.softmax(1)[:, 1]
    keep = score > threshold
    scored = torch.cat([boxes[keep, :4], score[keep, None]], 1)
    scored = _regress(scored, offsets[keep])
    return scored[scored[:, 4].argsort(descending=True)]


def _crops(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, h, w), (K, 4) -> (K, 3, size, size): each box resampled, black outside the photo
    (as MTCNN was trained)."""
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], 1)
    # 2x2 samples averaged per output pixel: 4x4 costs 3x more and finds the same faces
    return roi_align(pixels, rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def _regress(scored: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each box's edges by its offsets, in units of the box's width and height."""
    sides = (scored[:, 2:4] - scored[:, 0:2]).repeat(1, 2)  # (K, 4): w, h, w, h
    return torch.cat([scored[:, :4] + offsets * sides, scored[:, 4:5]], 1)


def _square(scored: torch.Tensor) -> torch.Tensor:
    """Each box grown to the square of its longer side, about the same centre (the crops the
    next net sees are square)."""
    centre = (scored[:, 0:2] + scored[:, 2:4]) / 2
    half = (scored[:, 2:4] - scored[:, 0:2]).amax(1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half, scored[:, 4:5]], 1)


def _suppress_nested(scored: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS where overlap is intersection over the *smaller* box: O-Net's boxes for one
    face sometimes nest (a chin box inside the face box), which IoU would keep apart."""
    boxes = scored[:, :4]
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area = box_area(boxes)
    overlap = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)
    keep: list[int] = []
    for i in scored[:, 4].argsort(descending=True).tolist():
        if all(overlap[i, j] <= threshold for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Faces -> tags
# --------------------------------------------------------------------------------------------

PORTRAIT_MIN_SIDE = 0.12  # the face's side as a fraction of the photo's shorter side
RIVAL_RATIO = 0.5  # a second face at least this fraction of the largest one's side is a rival
GROUP_MIN_FACES = 3  # faces of comparable size (rivals of the largest, itself included)


def people_tags(faces: list[Face], size: tuple[int, int]) -> list[PeopleTag]:
    """``person`` for any face; ``portrait`` for one large face with no rival; ``group`` for
    ``GROUP_MIN_FACES`` or more faces of comparable size. ``size`` is the photo's (width,
    height). Probabilities are the detector's face scores, uncalibrated."""
    if not faces:
        return []
    tags = [PeopleTag("person", max(f.score for f in faces))]
    by_size = sorted(faces, key=lambda f: f.side, reverse=True)
    largest = by_size[0]
    peers = [f for f in by_size if f.side >= RIVAL_RATIO * largest.side]
    if len(peers) == 1 and largest.side >= PORTRAIT_MIN_SIDE * min(size):
        tags.append(PeopleTag("portrait", largest.score))
    if len(peers) >= GROUP_MIN_FACES:
        # the weakest of the faces that make the group
        weakest = sorted((f.score for f in peers), reverse=True)[GROUP_MIN_FACES - 1]
        tags.append(PeopleTag("group", weakest))
    return tags
