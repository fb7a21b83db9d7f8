"""Face descriptors: dlib's ResNet face recognition network
(``dlib_face_recognition_resnet_model_v1``, Davis King, 2017; 99.38% on LFW) in PyTorch, and the
alignment that feeds it.

The network maps a 150x150 RGB face chip to a 128-d descriptor; two faces of the same person lie
closer than 0.6 in Euclidean distance (dlib's threshold, :data:`SAME_PERSON_DISTANCE`). The
weights are dlib's (CC0, as shipped in PyPI's ``face-recognition-models``), converted once by
``tools/convert_dlib_face_weights.py`` into ``model/weights/dlib_face_recognition.safetensors``;
each of dlib's affine layers (its batch norm, frozen) is folded into the convolution before it.
The layers follow dlib's ``examples/dnn_face_recognition_ex.cpp`` (``anet_type``) and its dnn
layers' arithmetic: convolutions of stride 2 and poolings have no padding, and a residual sum of
two tensors of different shapes is taken over the larger one, the smaller zero-padded below, to
the right and in its last channels (dlib's ``add_prev``).

What the network expects (checked against dlib's own ``compute_face_descriptor``): RGB 0..255
(dlib subtracts per-channel means 122.782, 117.001, 104.298, stored in the weights file, then
divides by 256), a face aligned as dlib's ``get_face_chip(img, shape, size=150, padding=0.25)``
aligns it: the face's landmarks at the positions of dlib's mean face, scaled so the face spans the
middle 100 of the 150 pixels.

Alignment: dlib's pipeline places its own 5 landmarks (eye corners, the base of the nose). Our
detector gives YuNet's five: eye centres, nose tip, mouth corners. :data:`YUNET_TEMPLATE` puts
those where dlib's mean face (the 68-point one its ``get_face_chip_details`` uses, in the same
frame as its 5-point positions) has them: the mean of each eye's six points, point 30 (nose
tip) and points 48 and 54 (mouth corners). :func:`align` fits the least-squares similarity
transform (rotation, uniform scale, translation) from those positions to a face's landmarks and
samples the chip as dlib's ``extract_image_chip`` does (:func:`chip_transform`; bilinear, the
photo box-reduced first for faces over twice the chip's size where dlib uses an image pyramid).
From dlib's own landmarks this gives dlib's chips pixel for pixel; from YuNet's, descriptors
close to dlib's full pipeline's, as ``tests/model/test_face_embedding.py`` measures.

Usage::

    embedder = load_embedder()
    chips = align_faces(rgb_image, faces)  # (N, 3, 150, 150) float32 RGB 0..255
    with torch.inference_mode():
        descriptors = embedder(chips)  # (N, 128)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from model.people.detector import Face

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "weights" / "dlib_face_recognition.safetensors"

CHIP_SIZE = 150  # the network's input side (dlib's input_rgb_image_sized<150>)
CHIP_PADDING = 0.25  # dlib's default: the face's unit frame spans 1 / (1 + 2 * 0.25) of the chip
DESCRIPTOR_DIM = 128
PIXEL_SCALE = 256.0  # dlib's input layer divides by 256 (not 255) after subtracting the means
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold: closer descriptors are taken as the same person

# Landmark positions in dlib's unit face frame (x right, y down, the face's mean shape spanning
# [0, 1] in x), which get_face_chip_details maps to the chip with (padding + p) / (1 + 2 *
# padding) * size.
# dlib's 5-point shape predictor's points, as get_face_chip_details places them: outer and inner
# corner of the eye on the right of the photo, outer and inner corner of the other eye, base of
# the nose (the 68-point mean face's points 45, 42, 36, 39, 33)
DLIB_5_POINT_TEMPLATE = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)
# YuNet's points (detector.Face.landmarks: the person's right eye, left eye, nose tip, right and
# left mouth corners) on dlib's 68-point mean face: each eye's six points averaged (36-41 and
# 42-47), point 30, points 48 and 54
YUNET_TEMPLATE = (
    (0.2254918, 0.2159903),
    (0.7547613, 0.2159903),
    (0.490127, 0.515625),
    (0.254149, 0.780233),
    (0.726104, 0.780233),
)

# (in channels, out channels, stride) of the 14 residual blocks, input to output: dlib's alevel4
# (3 x 32), alevel3 (4 x 64), alevel2 (3 x 128), alevel1 (3 x 256), alevel0 (1 x 256)
BLOCKS = (
    (32, 32, 1), (32, 32, 1), (32, 32, 1),
    (32, 64, 2), (64, 64, 1), (64, 64, 1), (64, 64, 1),
    (64, 128, 2), (128, 128, 1), (128, 128, 1),
    (128, 256, 2), (256, 256, 1), (256, 256, 1),
    (256, 256, 2),
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The network; attribute names are the weights file's keys
# --------------------------------------------------------------------------------------------


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger of two (B, C, H, W) shapes, each tensor
    zero-padded in its last channels, rows and columns. Shapes are fixed by the 150 px input,
    so this traces to constant pads."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        if (c, h, w) == tuple(shape):
            return t
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """dlib's ``ares`` (stride 1) or ``ares_down`` (stride 2): two 3x3 convolutions (each with
    dlib's affine folded in), ReLU between; the input, 2x2 average-pooled when striding, added;
    then ReLU. A strided convolution has no padding (dlib's default for stride 2), so its output
    can be a row and column smaller than the pooled input: 8 -> 3 against 4, 4 -> 1 against 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride, padding=1 if stride == 1 else 0
        )
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.stride == 2 else x
        return F.relu(add_padded(y, shortcut))


class FaceEmbedder(nn.Module):
    """dlib's face recognition ResNet: face chips (B, 3, 150, 150) float RGB 0..255 -> descriptors
    (B, 128), not normalised (dlib's own output). No data-dependent control flow: it traces, and
    OpenVINO converts it as it is. Channels-last input runs faster in torch on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        # dlib's per-channel means (R, G, B), read from its file
        self.register_buffer("pixel_mean", torch.zeros(3))
        self.stem = nn.Conv2d(3, 32, 7, 2)  # (B, 32, 72, 72); then 3x3/2 max-pool to 35x35
        self.blocks = nn.Sequential(*(ResidualBlock(*args) for args in BLOCKS))
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if tuple(chips.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"expected (B, 3, {CHIP_SIZE}, {CHIP_SIZE}) chips, got {chips.shape}")
        x = (chips - self.pixel_mean.view(1, 3, 1, 1)) / PIXEL_SCALE
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)  # (B, 32, 35, 35)
        x = self.blocks(x)  # (B, 256, 2, 2): 35 -> 17 -> 8 -> 4 -> 2
        return self.fc(x.mean((2, 3)))  # (B, 128)


def load_embedder(path: str | Path | None = None) -> FaceEmbedder:
    """The network with the weights in ``path`` (default: the shipped file), in eval mode."""
    net = FaceEmbedder()
    net.load_state_dict(load_file(str(path or WEIGHTS_PATH)), strict=True)
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Photo + landmarks -> chip
# --------------------------------------------------------------------------------------------


def chip_positions(
    template: Sequence[Sequence[float]], size: int = CHIP_SIZE, padding: float = CHIP_PADDING
) -> np.ndarray:
    """A template's points (K, 2) in the unit face frame -> where they lie in a chip of ``size``
    pixels, as dlib's get_face_chip_details places them (pixel centres at integers)."""
    return (np.asarray(template, np.float64) + padding) / (1 + 2 * padding) * size


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation, uniform scale and translation that best map points ``source`` (K, 2) onto
    ``target`` (K, 2) in least squares (Umeyama's, without reflection; dlib's
    find_similarity_transform), as a (2, 3) matrix: target ~ m[:, :2] @ source + m[:, 2]."""
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    s = source - source.mean(0)
    t = target - target.mean(0)
    norm = (s**2).sum()
    if norm == 0:
        raise ValueError("the source points all coincide")
    a = (s * t).sum() / norm  # scale * cos(angle)
    b = (s[:, 0] * t[:, 1] - s[:, 1] * t[:, 0]).sum() / norm  # scale * sin(angle)
    rotation = np.array([[a, -b], [b, a]])
    return np.hstack([rotation, (target.mean(0) - rotation @ source.mean(0))[:, None]])


def chip_transform(
    points: Sequence[Sequence[float]],
    template: Sequence[Sequence[float]],
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
) -> np.ndarray:
    """Where each chip pixel is read from: the (2, 3) map chip pixel -> photo pixel (pixel
    centres at integers in both) for a face whose landmarks ``points`` (K, 2) correspond to
    ``template`` (K, 2, unit face frame).

    As dlib's get_face_chip_details and extract_image_chip, whose chips the network was trained
    on: the least-squares similarity transform from the template's chip positions to the
    landmarks gives the angle, the scale s (photo pixels per chip pixel) and the centre (where
    chip point (size / 2, size / 2) falls); dlib then spreads chip pixels 0 .. size - 1 over a
    rectangle of side size * s - 1 about that centre, so chip pixel (size - 1) / 2 lands on the
    centre and neighbours lie (size * s - 1) / (size - 1) apart, a little less than s."""
    fit = similarity_transform(chip_positions(template, size, padding), points)
    scale = float(np.hypot(*fit[:, 0]))
    if not np.isfinite(scale) or size * scale <= 1:
        raise ValueError(f"landmarks {points} span no face")
    linear = fit[:, :2] * ((size * scale - 1) / ((size - 1) * scale))
    centre = fit @ (size / 2, size / 2, 1)
    return np.hstack([linear, (centre - linear @ ((size - 1) / 2, (size - 1) / 2))[:, None]])


def sample_chip(
    image: Image.Image, chip_to_photo: np.ndarray, size: int = CHIP_SIZE
) -> Image.Image:
    """The RGB chip of ``size`` pixels whose pixel (x, y) is the photo bilinearly sampled at
    ``chip_to_photo @ (x, y, 1)``, black outside the photo. Only the chip's footprint is read.
    Where chip pixels lie two or more photo pixels apart, the footprint is first box-reduced by
    that integer factor (dlib samples from an image pyramid), so that sampling does not alias."""
    linear, offset = chip_to_photo[:, :2], chip_to_photo[:, 2]
    scale = float(np.hypot(*linear[:, 0]))
    factor = int(scale) if scale >= 2 else 1
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], np.float64)
    footprint = corners @ linear.T + offset  # (4, 2) in the photo
    margin = 2 * factor  # the bilinear filter's reach, in photo pixels
    x0, y0 = np.floor(footprint.min(0)).astype(int) - margin
    x1, y1 = np.ceil(footprint.max(0)).astype(int) + margin
    width, height = -(-(x1 - x0) // factor) * factor, -(-(y1 - y0) // factor) * factor
    region = image.crop((int(x0), int(y0), int(x0 + width), int(y0 + height)))  # black outside
    region = region if region.mode == "RGB" else region.convert("RGB")
    if factor > 1:
        region = region.reduce(factor)  # pixel j: the mean of photo pixels x0 + j f .. + f - 1
    # chip pixel -> region pixel (centres at integers): region = (photo - x0 - (f - 1) / 2) / f
    linear = linear / factor
    offset = (offset - (x0, y0) - (factor - 1) / 2) / factor
    # PIL maps output to input pixels in pixel-area coordinates (centres at .5)
    area_offset = offset + 0.5 - linear @ (0.5, 0.5)
    data = (*linear[0], area_offset[0], *linear[1], area_offset[1])
    return region.transform(
        (size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR
    )


def align_points(
    image: Image.Image,
    points: Sequence[Sequence[float]],
    template: Sequence[Sequence[float]] = YUNET_TEMPLATE,
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
) -> Image.Image:
    """The face whose landmarks ``points`` (K, 2; the photo's pixels, pixel centres at integers)
    correspond to ``template`` (K, 2; unit face frame) as an RGB chip of ``size`` pixels, aligned
    as dlib aligns: from dlib's own five landmarks and :data:`DLIB_5_POINT_TEMPLATE` this is
    dlib's get_face_chip, pixel for pixel, for faces under twice the chip's size."""
    return sample_chip(image, chip_transform(points, template, size, padding), size)


def align(image: Image.Image, face: Face, size: int = CHIP_SIZE) -> Image.Image:
    """One detected face (YuNet's five landmarks) as the network's RGB chip."""
    if len(face.landmarks) != len(YUNET_TEMPLATE):
        raise ValueError(f"a face needs {len(YUNET_TEMPLATE)} landmarks, got {face.landmarks}")
    return align_points(image, face.landmarks, YUNET_TEMPLATE, size)


def chips_to_tensor(chips: Sequence[Image.Image]) -> torch.Tensor:
    """RGB chips -> the network's input, (N, 3, S, S) float32 RGB 0..255."""
    if not chips:
        return torch.zeros((0, 3, CHIP_SIZE, CHIP_SIZE))
    pixels = np.stack([np.asarray(chip, np.uint8) for chip in chips])  # (N, S, S, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float()


def align_faces(image: Image.Image, faces: Sequence[Face]) -> torch.Tensor:
    """Every face of a photo as one batch for :class:`FaceEmbedder`: (N, 3, 150, 150) float32
    RGB 0..255, in the order of ``faces``."""
    return chips_to_tensor([align(image, face) for face in faces])
