"""Photo bytes -> tags: one checkpoint on one runtime, with no HTTP in sight.

The server, library tagging and any other caller share this pipeline::

    tagger = Tagger.load("checkpoints/default.safetensors")
    for tag in tagger.tag(Path("cat.jpg").read_bytes()):
        print(tag.label, tag.probability)

The server splits the same steps over its threads: :meth:`Tagger.pixels` on decode threads,
:meth:`Tagger.probabilities` for a whole batch on its inference thread, :meth:`Tagger.tags` per
photo.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from model import imageio
from model.checkpoint import Checkpoint, ModelCard
from model.checkpoint import load as load_checkpoint
from model.people import FaceDetector, people_tags
from model.preprocess import normalize, resize_and_crop
from model.runtime import Runtime, RuntimeChoice, create_runtime
from model.vocabulary import Vocabulary

log = logging.getLogger("phototag.tagger")

DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_REDUCING_GAP = 2.0


View = Literal["tags", "classes"]  # the vocabulary's tags, or the network's raw classes


@dataclass(frozen=True)
class Prepared:
    """A decoded photo, ready for the network: what :meth:`Tagger.prepare` returns."""

    pixels: torch.Tensor  # uint8 (3, crop, crop)
    people: tuple[Tag, ...] = ()  # people tags of the faces on it (none when people are off)


def with_people(
    tags: list[Tag], people: Sequence[Tag], top_k: int, threshold: float | None
) -> list[Tag]:
    """The classifier's tags with the people tags, most probable first, at most ``top_k``. A
    people tag's parents are implied: a "people" category tag beside them goes."""
    people = [t for t in people if threshold is None or t.probability >= threshold]
    if not people:
        return tags
    implied = {p.path[:i] for p in people for i in range(1, len(p.path or ()))}
    merged = [t for t in tags if t.path not in implied] + list(people)
    return sorted(merged, key=lambda t: -t.probability)[:top_k]


@dataclass(frozen=True)
class Tag:
    label: str
    probability: float
    path: tuple[str, ...] | None = None  # from the top category down; None for a raw class


class Tagger:
    """The network of one checkpoint, ready to turn photos into tags.

    Not thread-safe by itself: the server runs every forward pass on its one inference thread."""

    def __init__(
        self, checkpoint: Checkpoint, runtime: Runtime, people: FaceDetector | None = None
    ) -> None:
        self.card: ModelCard = checkpoint.card
        self.people = people  # faces -> people tags; None: off
        vocabulary = self.card.vocabulary
        self.vocabulary = (
            Vocabulary.from_dict(vocabulary, self.card.classes) if vocabulary else None
        )
        self.version = checkpoint.version  # of what it computes (model.checkpoint.output_version)
        self.file_digest = checkpoint.file_digest
        self.path = checkpoint.path
        self.runtime = runtime

    @classmethod
    def load(
        cls,
        path: str | Path,
        choice: RuntimeChoice | None = None,
        people: FaceDetector | None = None,
    ) -> Tagger:
        """Read a checkpoint and put it on ``choice``'s runtime (default: the best this machine
        has, as ``PHOTOTAG_DEVICE``/``PHOTOTAG_BACKEND`` ``auto`` would choose); ``people``
        adds people tags from the faces it finds."""
        choice = choice or RuntimeChoice.resolve()
        checkpoint = load_checkpoint(path)
        net = checkpoint.build_model("cpu")
        runtime = create_runtime(net, checkpoint.card.preprocess.crop, choice)
        return cls(checkpoint, runtime, people)

    @property
    def card_name(self) -> str:
        return self.card.name

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def backend(self) -> str:
        return self.runtime.backend

    @property
    def precision(self) -> str:
        return self.runtime.precision

    # ---- the pipeline, step by step

    def draft_size(self, reducing_gap: float) -> int | None:
        """The JPEG draft target: both sides of a photo decoded at a reduced scale stay at least
        ``reducing_gap`` times the resize size; None (0) decodes in full."""
        return round(self.card.preprocess.resize * reducing_gap) or None

    def pixels(
        self,
        data: bytes,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reducing_gap: float = DEFAULT_REDUCING_GAP,
    ) -> torch.Tensor:
        """Photo bytes -> uint8 (3, crop, crop), resized and cropped as the checkpoint says.
        Pillow only (no torch kernels), so it can run on threads beside the network. Raises
        :class:`model.imageio.PhotoError` for bytes it will not take."""
        image = self._decode(data, max_pixels, reducing_gap)
        return resize_and_crop(image, self.card.preprocess)

    def prepare(
        self,
        data: bytes,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reducing_gap: float = DEFAULT_REDUCING_GAP,
    ) -> Prepared:
        """Photo bytes -> what :meth:`probabilities` and :meth:`tags` need of the photo: its
        pixels (:meth:`pixels`) and, when people tags are on, the people tags of the faces found
        on the same decoded photo. Runs on threads beside the network, like :meth:`pixels`."""
        image = self._decode(data, max_pixels, reducing_gap)
        people: tuple[Tag, ...] = ()
        if self.people is not None:
            faces = self.people.detect(image)
            people = tuple(
                Tag(t.label, t.probability, ("people", t.label))
                for t in people_tags(faces, image.size)
            )
        return Prepared(resize_and_crop(image, self.card.preprocess), people)

    def _decode(self, data: bytes, max_pixels: int, reducing_gap: float) -> Image.Image:
        draft = self.draft_size(reducing_gap)
        return imageio.decode(data, max_pixels=max_pixels, draft_size=draft)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels (normalised here, on the device) -> (B, num_classes)
        probabilities on the CPU: softmax of the temperature-scaled logits, or one sigmoid per
        tag for a multi-label model."""
        batch = batch.to(self.device, non_blocking=True)
        logits = self.runtime.run(normalize(batch, self.card.preprocess)).logits
        logits = logits / self.card.temperature
        if self.card.task == "multi_label":
            return torch.sigmoid(logits).cpu()
        return torch.softmax(logits, dim=1).cpu()

    def tags(
        self,
        probabilities: torch.Tensor,
        top_k: int = 5,
        threshold: float | None = None,
        view: View = "tags",
        people: Sequence[Tag] = (),
    ) -> list[Tag]:
        """One photo's (num_classes,) probabilities -> at most ``top_k`` tags, most probable
        first. ``view="tags"``: the vocabulary's most specific confident tags, probabilities
        rolled up, each at least ``threshold`` probable (default: each tag's own threshold);
        a checkpoint without a vocabulary has its classes as tags. ``view="classes"``: the
        network's classes, at least ``threshold`` probable (default: the card's per-class
        thresholds where it has them, else every one). ``people`` (from :meth:`prepare`) join
        the tags, and only them."""
        if view == "classes":
            return self._class_tags(probabilities, top_k, threshold)
        if self.vocabulary is not None:
            rolled = self.vocabulary.roll_up(probabilities, self.card.task)
            scored = self.vocabulary.select(rolled, top_k, threshold)
            tags = [Tag(s.label, s.probability, s.path) for s in scored]
        else:  # the classes are the tags
            tags = [
                Tag(t.label, t.probability, (t.label,))
                for t in self._class_tags(probabilities, top_k, threshold)
            ]
        return with_people(tags, people, top_k, threshold)

    def _class_tags(
        self, probabilities: torch.Tensor, top_k: int, threshold: float | None
    ) -> list[Tag]:
        if threshold is not None:
            keep = probabilities >= threshold
        elif self.card.thresholds is not None:
            keep = probabilities >= torch.tensor(self.card.thresholds)
        else:
            keep = torch.ones_like(probabilities, dtype=torch.bool)
        values, indices = probabilities.topk(min(top_k, len(self.classes)))
        return [
            Tag(self.classes[i], float(p))
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
            if keep[i]
        ]

    # ---- all at once

    def tag(
        self, data: bytes, top_k: int = 5, threshold: float | None = None, view: View = "tags"
    ) -> list[Tag]:
        """Photo bytes -> tags, in one call (one photo, one forward pass)."""
        prepared = self.prepare(data)
        probabilities = self.probabilities(prepared.pixels[None])[0]
        return self.tags(probabilities, top_k, threshold, view, prepared.people)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Forward passes on blank batches (one per size: cuDNN picks its kernels per shape), so
        the first real requests pay no start-up cost."""
        crop = self.card.preprocess.crop
        for size in batch_sizes:
            self.probabilities(torch.zeros(size, 3, crop, crop, dtype=torch.uint8))
        log.info(
            "model %s version %s ready on %s (backend %s, %s)",
            self.card_name,
            self.version,
            self.device,
            self.backend,
            self.precision,
        )
