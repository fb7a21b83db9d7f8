"""The face detector: YuNet (``model/people/yunet.py``) on the process's runtime, one photo at a
time, with each face's box, score and five landmarks in the photo's pixels.

The network runs where the classifier does: OpenVINO on a CPU where it is installed, torch
otherwise, on the GPU when there is one (:class:`model.runtime.RuntimeChoice`). Each photo is
read at its own size (longest side ``work_size``, padded to a multiple of 32): one forward pass
and a vectorised decoding, no loop over pixels or windows. Photos are not batched: at 640 px a
batch of 8 runs slower per photo on a CPU than photos one by one (bench/README.md), and photos
of different shapes would have to be padded to one.

Usage::

    detector = FaceDetector.load()
    faces = detector.detect(rgb_image)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from model.people import yunet
from model.runtime import (
    Backend,
    RuntimeChoice,
    ThreadedOpenVINO,
    choose_backend,
    convert_for_openvino,
)

if TYPE_CHECKING:
    from model.people.animals import AnimalCheck


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float  # the detector's confidence, 0..1
    # the person's right eye, left eye, nose tip, right and left mouth corners: (x, y) each
    landmarks: tuple[tuple[float, float], ...] = ()

    @property
    def side(self) -> float:
        """The face's size in pixels: the side of the square of the box's area."""
        x0, y0, x1, y1 = self.box
        return math.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))


@dataclass(frozen=True)
class Detection:
    """What one run of the detector found, and the size of the image the network saw."""

    faces: list[Face]
    work_size: tuple[int, int]  # (width, height), before padding


@dataclass(frozen=True)
class DetectorConfig:
    """How the detector looks (bench/people_bench.py measures the choices)."""

    work_size: int = 640  # longest side the network sees; larger photos are downscaled first
    # a face at least this confident counts (bench/people_bench.py: lower, patterns and
    # insects' heads come in faster than people); animals' faces are dropped after, by
    # FaceDetector.animals
    score_threshold: float = 0.6
    nms_iou: float = yunet.NMS_IOU  # the library's
    max_faces: int = 64  # the most confident faces kept on a crowded photo

    def __post_init__(self) -> None:
        if self.work_size < yunet.PAD_MULTIPLE:
            raise ValueError(f"work_size must be at least {yunet.PAD_MULTIPLE}, got {self}")
        if not 0 < self.score_threshold <= 1 or not 0 < self.nms_iou <= 1:
            raise ValueError(f"score_threshold and nms_iou lie in (0, 1], got {self}")
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be at least 1, got {self.max_faces}")


class Network(Protocol):
    """YuNet ready for inference on one backend; safe to call from several threads at once."""

    backend: Backend
    device: torch.device

    def run(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(1, H, W, 3) uint8 RGB on the CPU (:func:`model.people.yunet.prepare_input`) -> the
        12 raw maps, on the CPU."""
        ...


class TorchNetwork:
    """YuNet in torch, channels-last, float32 (it is tiny: reduced precision would only move
    the scores its thresholds were measured on)."""

    backend: Backend = "torch"

    def __init__(self, net: yunet.YuNet, device: torch.device) -> None:
        self.device = device
        self.net = net.to(device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [m.float().cpu() for m in self.net(yunet.network_input(pixels.to(self.device)))]


class OpenVINONetwork:
    """YuNet compiled by OpenVINO for this CPU with a free height and width, so each photo runs
    at its own padded size, for calls from the decode threads (:class:`ThreadedOpenVINO`). In
    bfloat16 where the CPU computes it natively (faster, and its scores move too little to
    change the faces found: bench/README.md), float32 elsewhere."""

    backend: Backend = "openvino"

    def __init__(self, net: yunet.YuNet, choice: RuntimeChoice, precision: str = "auto") -> None:
        self.device = torch.device("cpu")
        model = convert_for_openvino(net.cpu(), torch.zeros(1, 3, 320, 320), [1, 3, -1, -1])
        self._network = ThreadedOpenVINO(_reads_prepared_pixels(model), choice, precision)
        self.precision = self._network.precision

    def run(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self._network.infer(pixels.contiguous().numpy())


def _reads_prepared_pixels(model):
    """The converted network with :func:`model.people.yunet.network_input` in its graph: it reads
    (1, H, W, 3) uint8 RGB, and OpenVINO's compiled graph turns it into float BGR planes, with no
    float copy of the photo in Python."""
    from openvino import Layout, Type
    from openvino.preprocess import ColorFormat, PrePostProcessor

    ppp = PrePostProcessor(model)
    pixels = ppp.input()
    pixels.tensor().set_element_type(Type.u8).set_layout(Layout("NHWC")).set_color_format(
        ColorFormat.RGB
    )
    pixels.model().set_layout(Layout("NCHW"))
    pixels.preprocess().convert_element_type(Type.f32).convert_color(ColorFormat.BGR)
    return ppp.build()


def create_network(net: yunet.YuNet, choice: RuntimeChoice, precision: str = "auto") -> Network:
    """The backend the classifier runs on (``choice``), for the detector too
    (:func:`model.runtime.choose_backend`). ``precision`` (OpenVINO only): ``auto``, ``f32`` or
    ``bf16``."""
    return choose_backend(
        choice,
        lambda: OpenVINONetwork(net, choice, precision),
        lambda: TorchNetwork(net, choice.device),
        "the face detector",
    )


class FaceDetector:
    """YuNet on one photo at a time. ``detect`` keeps no state between calls, so several threads
    may call it at once; it leaves torch's global settings (threads, grad mode) as they are."""

    def __init__(
        self,
        network: Network,
        config: DetectorConfig | None = None,
        animals: AnimalCheck | None = None,
    ) -> None:
        self.network = network
        self.config = config or DetectorConfig()
        self.animals = animals  # drops animals' faces; None keeps every face

    @classmethod
    def load(
        cls,
        choice: RuntimeChoice | None = None,
        config: DetectorConfig | None = None,
        path: str | Path | None = None,
        precision: str = "auto",
        animals: bool = True,
    ) -> FaceDetector:
        """The detector with the weights in ``path`` (default: the shipped file), on the runtime
        ``choice`` (default: what ``auto`` resolves to here; ``precision``, the detector's: see
        :class:`OpenVINONetwork`), with the check that drops animals' faces
        (:mod:`model.people.animals`) unless ``animals`` is False."""
        from model.people.animals import AnimalCheck

        choice = choice or RuntimeChoice.resolve()
        network = create_network(yunet.load_yunet(path), choice, precision)
        return cls(network, config, AnimalCheck.load(choice) if animals else None)

    @property
    def backend(self) -> Backend:
        return self.network.backend

    def detect(self, image: Image.Image) -> list[Face]:
        """The faces in an image of any size and mode, best first; boxes and landmarks in the
        image's pixels."""
        return self.run(image).faces

    def run(self, image: Image.Image) -> Detection:
        """:meth:`detect`, with the size the network saw."""
        c = self.config
        prepared = yunet.prepare_input(image, c.work_size)
        maps = self.network.run(prepared.pixels)
        [rows] = yunet.decode(
            maps,
            prepared.padded,
            score_threshold=c.score_threshold,
            nms_iou=c.nms_iou,
            keep_top_k=c.max_faces,
        )
        rows = yunet.to_original(rows, prepared.scale)
        faces = [_face(row, image.size) for row in rows.tolist()]
        if self.animals is not None:
            faces = self.animals.people(image, faces)
        return Detection(faces, prepared.size)


def _face(row: list[float], size: tuple[int, int]) -> Face:
    """One decoded row (``yunet.FACE_COLUMNS``) -> a Face, its box clipped to the photo."""
    width, height = size
    x0, y0, x1, y1 = row[:4]
    box = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
           min(max(y1, 0.0), height))  # fmt: skip
    points = tuple((row[i], row[i + 1]) for i in range(5, 15, 2))
    return Face(box=box, score=row[4], landmarks=points)
