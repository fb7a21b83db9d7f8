"""Animals' faces told from people's.

The face detector also finds faces on dogs, cats, teddy bears and insects' heads, and, the
lower its score threshold, the more of them. The ImageNet classifier knows some four hundred
animals and no person, so it tells them apart: it reads each face with its surroundings (a
square :data:`SURROUNDINGS` times the face's box: a person's head and shoulders, an animal's
head) and a face whose surroundings it gives at least :data:`ANIMAL_THRESHOLD` to the vocabulary's
``animal`` branch is an animal's. What it reads a person's face as (a suit, a wig, a neck
brace) is spread over many other classes. bench/people_bench.py measures the rule.

The network is the shipped ImageNet EfficientNet-Lite0 whatever the server serves (a trained
checkpoint has no animal branch), on the classifier's runtime; like the detector, the decode
threads call it, all of one photo's faces in one batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from PIL import Image

from model import pretrained
from model.people.detector import Face
from model.preprocess import Preprocess, center_crop, normalize
from model.runtime import (
    RuntimeChoice,
    ThreadedOpenVINO,
    choose_backend,
    convert_for_openvino,
    fold_batchnorm,
    openvino_precision,
)
from model.vocabulary import Vocabulary, shipped

SURROUNDINGS = 2.2  # the side of the square read around a face, in its box's longer edges
ANIMAL_THRESHOLD = 0.5  # a face whose surroundings are at least this likely an animal is one
MAX_CHECKED = 4  # the most confident faces of a photo checked (a pass each); the rest are kept
ANIMAL = ("animal",)  # the vocabulary branch that gathers the animal classes
REDUCING_GAP = 2.0  # a large photo's part is box-reduced first, down to twice the size read

# uint8 (N, 3, S, S) pixels on the CPU -> (N, num_classes) logits on the CPU
Classifier = Callable[[torch.Tensor], torch.Tensor]


class AnimalCheck:
    """Which faces are animals'. Keeps no state between calls: several threads may call it."""

    def __init__(self, network: Classifier, size: int, vocabulary: Vocabulary) -> None:
        self.network = network
        self.size = size  # the side of the square the network reads
        self._square = Preprocess(resize=size, crop=size)  # the surroundings, already that size
        column = next(i for i, t in enumerate(vocabulary.tags) if t.path == ANIMAL)
        # the roll-up (Vocabulary.roll_up) of the one tag read: the classes it gathers
        self._animal = vocabulary.membership[:, column]

    @classmethod
    def load(cls, choice: RuntimeChoice | None = None) -> AnimalCheck:
        """The shipped ImageNet Lite0 on the runtime ``choice`` (default: what ``auto`` resolves
        to here), in the classifier's precision (:func:`model.runtime.openvino_precision`). One
        per choice in a process, built on first use: it keeps no state, and building it
        (conversion, compilation) takes seconds."""
        return _shared(choice or RuntimeChoice.resolve())

    def probabilities(self, image: Image.Image, faces: list[Face]) -> list[float]:
        """How likely each face (of the first :data:`MAX_CHECKED`) is an animal's: the
        classifier's probability of the animal branch on the face's surroundings."""
        faces = faces[:MAX_CHECKED]
        if not faces:
            return []
        square = self._square
        pixels = torch.stack(
            [center_crop(surroundings(image, f, self.size), square) for f in faces]
        )
        classes = torch.softmax(self.network(pixels).float(), dim=1)
        return (classes @ self._animal).clamp(0, 1).tolist()

    def people(self, image: Image.Image, faces: list[Face]) -> list[Face]:
        """``faces``, most confident first (as the detector gives them), without the animals'
        among the first :data:`MAX_CHECKED`."""
        animal = self.probabilities(image, faces)
        return [f for i, f in enumerate(faces) if i >= len(animal) or animal[i] < ANIMAL_THRESHOLD]


@functools.cache
def _shared(choice: RuntimeChoice) -> AnimalCheck:
    pre = pretrained.BACKBONES[pretrained.DEFAULT_BACKBONE].preprocess
    net = pretrained.imagenet_network()
    network = choose_backend(
        choice,
        lambda: OpenVINOClassifier(net, pre, choice),
        lambda: TorchClassifier(net, pre, choice.device),
        "the animal check",
    )
    vocabulary = Vocabulary.from_dict(shipped("imagenet"), pretrained.imagenet_classes())
    return AnimalCheck(network, pre.crop, vocabulary)


def surroundings(image: Image.Image, face: Face, size: int) -> Image.Image:
    """The square :data:`SURROUNDINGS` times the face box's longer edge, centred on the box, as
    ``size`` x ``size`` RGB; what lies beyond the photo's edge is black. Only the photo's part
    inside the square is read and resized, so a large photo costs no more than a small one."""
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0, 1.0) * SURROUNDINGS
    left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
    inside = (max(left, 0.0), max(top, 0.0), min(left + side, image.width),
              min(top + side, image.height))  # fmt: skip
    scale = size / side
    width, height = round((inside[2] - inside[0]) * scale), round((inside[3] - inside[1]) * scale)
    canvas = Image.new("RGB", (size, size))
    if width > 0 and height > 0:
        part = image.resize(
            (width, height), Image.Resampling.BILINEAR, box=inside, reducing_gap=REDUCING_GAP
        )
        at = (round((inside[0] - left) * scale), round((inside[1] - top) * scale))
        canvas.paste(part.convert("RGB"), at)
    return canvas


class TorchClassifier:
    """The classifier in torch, float32, for the decode threads (a GPU's, or where OpenVINO is
    not installed)."""

    def __init__(self, net: torch.nn.Module, preprocess: Preprocess, device: torch.device) -> None:
        self.net = net.to(device)
        self.preprocess = preprocess
        self.device = device

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(pixels.to(self.device), self.preprocess)).float().cpu()


class OpenVINOClassifier:
    """The classifier compiled by OpenVINO for the decode threads, any batch size; it reads
    uint8 pixels and normalises them inside its compiled graph."""

    def __init__(self, net: torch.nn.Module, pre: Preprocess, choice: RuntimeChoice) -> None:
        example = torch.zeros(1, 3, pre.crop, pre.crop)
        model = convert_for_openvino(
            fold_batchnorm(net).cpu(), example, [-1, 3, pre.crop, pre.crop]
        )
        model = _reads_uint8(model, pre)
        self._network = ThreadedOpenVINO(model, choice, openvino_precision(choice))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._network.infer(pixels.contiguous().numpy())[0]


def _reads_uint8(model, pre: Preprocess):
    """The converted network with :func:`model.preprocess.normalize` in its graph: it reads
    uint8 (N, 3, crop, crop) pixels."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    pixels = ppp.input()
    pixels.tensor().set_element_type(Type.u8).set_layout(Layout("NCHW"))
    pixels.model().set_layout(Layout("NCHW"))
    pixels.preprocess().convert_element_type(Type.f32).mean([255 * m for m in pre.mean]).scale(
        [255 * s for s in pre.std]
    )
    return ppp.build()
