"""Photo bytes -> tags: one checkpoint on one runtime, with no HTTP in sight.

The server, library tagging and any other caller share this pipeline::

    tagger = Tagger.load("checkpoints/default.safetensors")
    for tag in tagger.tag(Path("cat.jpg").read_bytes()):
        print(tag.label, tag.probability)

The server splits the same steps over its threads: :meth:`Tagger.pixels` on decode threads,
:meth:`Tagger.outputs` for a whole batch on its inference thread, :meth:`Tagger.tags` per
photo. One forward pass serves every head: the classifier's probabilities, and from them the
custom tags' (:mod:`model.custom_tags`), all of them in one matrix multiply. Why a photo got a
tag: :meth:`Tagger.explain` (a heatmap, see ``model/explain.py``) and :meth:`Tagger.write_overlay`
(the heatmap drawn on the photo, as a PNG file).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from model import imageio
from model.checkpoint import Checkpoint, ModelCard, probabilities_version
from model.checkpoint import load as load_checkpoint
from model.custom_tags import CustomHeads, Examples, Space, Suppressions
from model.explain import (
    Explainer,
    Heatmap,
    Target,
    class_target,
    custom_target,
    vocabulary_target,
    write_overlay,
)
from model.imageio import full_size
from model.people import (
    PEOPLE,
    PEOPLE_TAGS,
    PERSON_CATEGORIES,
    FaceDetector,
    people_tags,
    person_from_categories,
)
from model.people.names import NamedFace, Namer
from model.preprocess import normalize, resize_and_crop
from model.regions import DEFAULT as DEFAULT_REGIONS
from model.regions import check as check_regions
from model.regions import crop as crop_regions
from model.regions import merge as merge_regions
from model.runtime import Outputs, Runtime, RuntimeChoice, create_runtime
from model.tta import TTA
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
    # its faces, named where a taught person is recognised, boxes in the photo as sent; None
    # when names are off (model.people.names)
    faces: tuple[NamedFace, ...] | None = None
    size: tuple[int, int] | None = None  # (width, height) of the photo as sent, with faces


def with_people(
    tags: list[Tag], people: Sequence[Tag], top_k: int, threshold: float | None
) -> list[Tag]:
    """The other tags with the people tags, most probable first, at most ``top_k`` besides the
    names of recognised people (``people/<name>``: each names a face, so none is left out). A
    people tag's parents are implied: a "people" category tag beside them goes."""
    people = [t for t in people if threshold is None or t.probability >= threshold]
    implied = {p.path[:i] for p in people for i in range(1, len(p.path or ()))}
    merged = sorted(
        [t for t in tags if t.path not in implied] + people, key=lambda t: -t.probability
    )
    names = [t for t in merged[top_k:] if is_name(t)]
    return sorted(merged[:top_k] + names, key=lambda t: -t.probability)


def is_name(tag: Tag) -> bool:
    """A recognised person's tag (path ``("people", name)``), not a face rule's."""
    path = tag.path or ()
    return len(path) == 2 and path[0] == PEOPLE and path[1] not in PEOPLE_TAGS


@dataclass(frozen=True)
class Tag:
    label: str
    probability: float
    path: tuple[str, ...] | None = None  # from the top category down; None for a raw class


class UnknownTag(KeyError):
    """A tag the model does not know; the message says where to find the ones it does."""

    def __str__(self) -> str:
        return str(self.args[0])


CUSTOM = "custom"  # the top of a custom tag's path: ("custom", name)


@dataclass(frozen=True)
class Scores:
    """What one forward pass gives for a batch (B, ...) or, after :meth:`unbind`, one photo."""

    probabilities: torch.Tensor  # (B, num_classes) the classifier's on the whole photo, on the CPU
    custom: torch.Tensor  # (B, K) the custom tags', in the order of ``heads.names``
    features: torch.Tensor  # (B, F) the pooled features
    mid: torch.Tensor  # (B, M) the mid-level features (TaggerNet.outputs); M = 0: none
    heads: CustomHeads  # the heads that scored ``custom`` (a swap later cannot mismatch them)
    regions: torch.Tensor | None = None  # (B, R, num_classes) the classifier's on R regions

    def unbind(self, dim: int = 0) -> list[Scores]:
        """One :class:`Scores` per photo (what the batcher hands each request)."""
        assert dim == 0
        regions = [None] * len(self.probabilities) if self.regions is None else self.regions
        rows = zip(self.probabilities, self.custom, self.features, self.mid, regions, strict=True)
        return [Scores(p, c, f, m, self.heads, r) for p, c, f, m, r in rows]

    @property
    def examples(self) -> Examples:
        """The photos (one photo's, after :meth:`unbind`) as custom tags' heads see them."""
        parts = (self.probabilities, self.features, self.mid)
        if self.probabilities.dim() == 1:
            parts = tuple(part[None] for part in parts)
        return Examples(*parts)


class Tagger:
    """The network of one checkpoint, ready to turn photos into tags.

    Not thread-safe by itself: the server runs every forward pass on its one inference thread.
    Explanations are (:meth:`explain`): they run on their own torch copy of the network."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        runtime: Runtime,
        people: FaceDetector | None = None,
        space: Space | None = None,
        regions: int = DEFAULT_REGIONS,
        names: Namer | None = None,
    ) -> None:
        self.card: ModelCard = checkpoint.card
        self.people = people  # faces -> people tags; None: off
        self.names = names  # faces -> taught names (people/<name> tags); None: off
        self.regions = check_regions(regions)  # parts of each photo tagged beside the whole
        vocabulary = self.card.vocabulary
        self.vocabulary = (
            Vocabulary.from_dict(vocabulary, self.card.classes) if vocabulary else None
        )
        # the vocabulary's categories that show a person with no face (model.people)
        self._person_categories = [
            (tag.path[0], i)
            for i, tag in enumerate(self.vocabulary.tags if self.vocabulary else [])
            if len(tag.path) == 1 and tag.path[0] in PERSON_CATEGORIES
        ]
        self.version = checkpoint.version  # of what it computes (model.checkpoint.output_version)
        self.file_digest = checkpoint.file_digest
        self.path = checkpoint.path
        self.runtime = runtime
        self.tta = TTA.named(self.card.tta)
        # the weights, for the torch copy explanations build when first asked (the runtime's
        # network may have no gradients: OpenVINO); let go once that copy holds them
        self._checkpoint: Checkpoint | None = checkpoint
        self._explainer: Explainer | None = None
        self._explainer_lock = threading.Lock()
        # custom tags are tied to this: what the probabilities their heads read depend on
        self.probabilities_version = probabilities_version(checkpoint.card, checkpoint.state_dict)
        # what custom tags' heads read: the probabilities and, where the network gives their
        # means, the pooled and mid-level features (``space``: worked out from the network)
        self.space = space if space is not None else Space.of(checkpoint.build_model("cpu"))
        # replaced whole, never changed in place: a batch reads one or the other
        self.custom_heads = CustomHeads(self.space)
        self.suppressions = Suppressions()

    @classmethod
    def load(
        cls,
        path: str | Path,
        choice: RuntimeChoice | None = None,
        people: FaceDetector | None = None,
        regions: int = DEFAULT_REGIONS,
        names: Namer | None = None,
    ) -> Tagger:
        """Read a checkpoint and put it on ``choice``'s runtime (default: the best this machine
        has, as ``PHOTOTAG_DEVICE``/``PHOTOTAG_BACKEND`` ``auto`` would choose); ``people``
        adds people tags from the faces it finds; ``regions`` (0 or 4; default: the server's)
        tags that many parts of each photo beside the whole (:mod:`model.regions`); ``names``
        (with ``people``) names the faces of people it was taught."""
        choice = choice or RuntimeChoice.resolve()
        checkpoint = load_checkpoint(path)
        net = checkpoint.build_model("cpu")
        space = Space.of(net)
        runtime = create_runtime(net, checkpoint.card.preprocess.crop, choice)
        return cls(checkpoint, runtime, people, space, regions, names)

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

    def photo(
        self,
        data: bytes,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reducing_gap: float = DEFAULT_REDUCING_GAP,
    ) -> Image.Image:
        """Photo bytes -> the upright RGB image this model reads (a JPEG at its draft scale).
        Raises :class:`model.imageio.PhotoError` for bytes it will not take."""
        draft = self.draft_size(reducing_gap)
        return imageio.decode(data, max_pixels=max_pixels, draft_size=draft)

    def crop(self, image: Image.Image) -> torch.Tensor:
        """A decoded photo -> uint8 (3, crop, crop), resized and cropped as the checkpoint says."""
        return resize_and_crop(image, self.card.preprocess)

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
        return self.crop(self.photo(data, max_pixels=max_pixels, reducing_gap=reducing_gap))

    def prepare(
        self,
        data: bytes,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reducing_gap: float = DEFAULT_REDUCING_GAP,
    ) -> Prepared:
        """Photo bytes -> what :meth:`probabilities` and :meth:`tags` need of the photo: its
        pixels (:meth:`pixels`) and, when people tags are on, the people tags of the faces found
        on the same decoded photo (with names on, ``people/<name>`` for each face recognised,
        and the faces). Runs on threads beside the network, like :meth:`pixels`."""
        image = self.photo(data, max_pixels=max_pixels, reducing_gap=reducing_gap)
        if self.people is None:
            return Prepared(self.views(image))
        faces = self.people.detect(image)
        people = tuple(
            Tag(t.label, t.probability, (PEOPLE, t.label)) for t in people_tags(faces, image.size)
        )
        if self.names is None:
            return Prepared(self.views(image), people)
        size = full_size(image)
        named = self.names.name(image, faces, size)
        people += tuple(
            Tag(f.name, f.probability, (PEOPLE, f.name))
            for f in named
            if f.name is not None and f.probability is not None
        )
        return Prepared(self.views(image), people, tuple(named), size)

    def views(self, image: Image.Image) -> torch.Tensor:
        """A decoded photo -> what the network reads of it: uint8 (3, crop, crop) (:meth:`crop`),
        or, with regions, the whole photo and its regions (1 + R, 3, crop, crop)
        (:func:`model.regions.crop`)."""
        whole = self.crop(image)
        if not self.regions:
            return whole
        parts = crop_regions(image, self.regions)
        return torch.stack([whole, *(self.crop(part) for part in parts)])

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels (normalised here, on the device) -> (B, num_classes)
        probabilities on the CPU: softmax of the temperature-scaled logits, or one sigmoid per
        tag for a multi-label model."""
        return self.outputs(batch).probabilities

    def outputs(self, batch: torch.Tensor) -> Scores:
        """(B, 3, H, W) uint8 pixels, or (B, 1 + R, 3, H, W) with each photo's regions after it
        (:meth:`views`) -> one forward pass's :class:`Scores`: the class probabilities (as
        :meth:`probabilities`; the regions' apart), every custom tag's (one (D, K) matrix
        multiply over the batch) and the pooled and mid-level features, all of the whole photos."""
        heads = self.custom_heads  # read once: a swap during the pass waits for the next
        views = batch.shape[1] if batch.dim() == 5 else 0
        batch = batch.to(self.device, non_blocking=True).flatten(0, 1 if views else 0)
        logits, features, mid = self._run(normalize(batch, self.card.preprocess))
        logits = logits / self.card.temperature
        if self.card.task == "multi_label":
            probabilities = torch.sigmoid(logits).cpu()
        else:
            probabilities = torch.softmax(logits, dim=1).cpu()
        features, mid = features.cpu(), mid.cpu()
        regions = None
        if views:  # (B * V, ...) -> the whole photos, and (B, R, C) their regions
            probabilities = probabilities.unflatten(0, (-1, views))
            probabilities, regions = probabilities[:, 0], probabilities[:, 1:]
            features, mid = features[::views], mid[::views]
        custom = heads.probabilities(Examples(probabilities, features, mid))
        return Scores(probabilities, custom, features, mid, heads, regions)

    def _run(self, batch: torch.Tensor) -> Outputs:
        """The runtime's outputs; with the card's TTA, the logits averaged over the views
        (:mod:`model.tta`) and the features (pooled and mid-level) of the photo itself."""
        views = self.tta.views(batch)
        if len(views) == 1:
            return self.runtime.run(batch)
        outputs = [self.runtime.run(view) for _, view in views]
        logits = sum(weight * out.logits for (weight, _), out in zip(views, outputs, strict=True))
        return outputs[0]._replace(logits=logits)

    def tags(
        self,
        probabilities: torch.Tensor | Scores,
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
        the tags, and only them.

        Given one photo's :class:`Scores`, ``view="tags"`` also has its custom tags (path
        ``("custom", name)``, each at least its own threshold, or ``threshold``), ranked with the
        others, and drops the vocabulary tags a person marked wrong on a similar photo
        (:class:`model.custom_tags.Suppressions`); ``view="classes"`` is the raw classes only."""
        tags, whole = self._own_tags(probabilities, top_k, threshold, view)
        if view == "classes":
            return tags
        if whole is not None:
            people = self._person_without_face(people, whole)
        return with_people(tags, people, top_k, threshold)

    def _own_tags(
        self, probabilities: torch.Tensor | Scores, top_k: int, threshold: float | None, view: View
    ) -> tuple[list[Tag], torch.Tensor | None]:
        """:meth:`tags` without the people tags: what the model itself gives, which its
        heatmaps can explain; and the whole photo's vocabulary tag probabilities (None without
        a vocabulary or with ``view="classes"``), which the person rule reads."""
        scores = probabilities if isinstance(probabilities, Scores) else None
        if scores is not None:
            probabilities = scores.probabilities
        if view == "classes":
            return self._class_tags(probabilities, top_k, threshold), None
        whole = None
        if self.vocabulary is not None:
            whole, rolled = self._rolled(scores if scores is not None else probabilities)
            alone = scores is None or scores.regions is None  # the whole photo's, no regions'
            tags = [
                Tag(s.label, s.probability, s.path)
                for s in self.vocabulary.select(rolled, top_k, threshold, whole=alone)
            ]
        else:  # the classes are the tags
            tags = [
                Tag(t.label, t.probability, (t.label,))
                for t in self._class_tags(probabilities, top_k, threshold)
            ]
        if scores is not None:
            wrong = self.suppressions.suppressed(scores.features)
            tags = [t for t in tags if t.label not in wrong] + self._custom_tags(scores, threshold)
        return tags, whole

    def tag_probabilities(self, probabilities: torch.Tensor | Scores) -> torch.Tensor:
        """One photo's vocabulary tag probabilities (T,): its classes' rolled up; given its
        :class:`Scores` with regions, the whole photo's merged with its likeliest region's
        (:func:`model.regions.merge`)."""
        return self._rolled(probabilities)[1]

    def _rolled(self, probabilities: torch.Tensor | Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """One photo's tag probabilities on the whole photo, and as served
        (:meth:`tag_probabilities`)."""
        assert self.vocabulary is not None
        scores = probabilities if isinstance(probabilities, Scores) else None
        whole = scores.probabilities if scores is not None else probabilities
        rolled = self.vocabulary.roll_up(whole, self.card.task)
        if scores is None or scores.regions is None:
            return rolled, rolled
        regional = self.vocabulary.roll_up(scores.regions, self.card.task)
        return rolled, merge_regions(rolled, regional)

    def _person_without_face(self, people: Sequence[Tag], rolled: torch.Tensor) -> Sequence[Tag]:
        """The people tags, with ``person`` from the classifier's categories where people tags
        are on and no face gave one (:meth:`person_category`). ``rolled``: the whole photo's
        tag probabilities, on which the evidence rule was measured: read with the regions, a broad
        category is likelier, and the false people doubled (bench/README.md)."""
        if self.people is None or any(t.label == "person" for t in people):
            return people
        found = self.person_category(rolled)
        if found is None:
            return people
        return (*people, Tag("person", found.probability, (PEOPLE, "person")))

    def person_category(self, rolled: torch.Tensor) -> Tag | None:
        """The vocabulary category that shows a person with no face, from one photo's rolled-up
        probabilities (:func:`model.people.person_from_categories`), or None."""
        probabilities = {c: float(rolled[i]) for c, i in self._person_categories}
        found = person_from_categories(probabilities)
        if found is None:
            return None
        category = max(probabilities, key=probabilities.__getitem__)
        return Tag(category, found.probability, (category,))

    @staticmethod
    def _custom_tags(scores: Scores, threshold: float | None) -> list[Tag]:
        heads = scores.heads
        return [
            Tag(name, float(p), (CUSTOM, name))
            for name, p, own in zip(
                heads.names, scores.custom.tolist(), heads.thresholds, strict=True
            )
            if p >= (own if threshold is None else threshold)
        ]

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

    # ---- why this tag

    def explainer(self) -> Explainer:
        """The torch copy of the network on the CPU that explanations run on: built on the
        first call (one forward pass to find its feature layer), then kept."""
        with self._explainer_lock:
            if self._explainer is None:
                assert self._checkpoint is not None
                self._explainer = Explainer(
                    self._checkpoint.build_model("cpu"),
                    self.card.preprocess,
                    self.card.temperature,
                )
                self._checkpoint = None
            return self._explainer

    def target(self, label: str, view: View = "tags") -> Target:
        """What explaining ``label`` differentiates: a vocabulary tag (``view="tags"``) through
        the classes it gathers, a raw class (``view="classes"``, or a checkpoint without a
        vocabulary) through its logit, a custom tag (``view="tags"``: ``custom/NAME``, or the
        bare name where the model has no tag of that name: its own tags come first) through its
        head's logit (:func:`model.explain.custom_target`). Raises :class:`UnknownTag`."""
        heads = self.custom_heads  # read once: the target keeps the heads it was made from
        customs = [f"{CUSTOM}/{name}" for name in heads.names] if view == "tags" else []

        def custom(name: str) -> Target:
            target = custom_target(heads, heads.names.index(name), self.card.task)
            return replace(target, path=(CUSTOM, name))

        def listed(labels: Sequence[str]) -> str:
            more = ", ..." if len(labels) > 5 else ""
            return f"{len(labels)}: {', '.join(labels[:5])}{more}" if labels else "none"

        parent, _, name = label.partition("/")
        if view == "tags" and parent == CUSTOM:  # a custom tag's path, never a label of the model
            if name in heads.names:
                return custom(name)
            raise UnknownTag(f"the model has no custom tag {name!r} (it has {listed(customs)})")
        if view == "tags" and self.vocabulary is not None:
            labels = [t.label for t in self.vocabulary.tags]
            if label in labels:
                return vocabulary_target(self.vocabulary, labels.index(label), self.card.task)
            kind = "vocabulary tag"
        else:
            labels = self.classes
            if label in labels:
                target = class_target(self.classes, self.classes.index(label), self.card.task)
                # the classes are the tags: a one-element path, as :meth:`tags` gives them
                return target if view == "classes" else replace(target, path=(label,))
            kind = "class"
        if view == "tags" and label in heads.names:
            return custom(label)
        others = f"; custom tags: {listed(customs)}" if customs else ""
        raise UnknownTag(f"the model has no {kind} {label!r} (it has {listed(labels)}{others})")

    def explain(self, pixels: torch.Tensor, tag: str | None = None, view: View = "tags") -> Heatmap:
        """uint8 (3, crop, crop) -> where the evidence for ``tag`` is (default: the whole photo's
        top tag of the model's own, the first :meth:`tags` returns for it but for people tags,
        which their faces explain; else its most probable tag of all). Thread-safe."""
        explainer = self.explainer()
        target = None if tag is None else self.target(tag, view)  # refused before any work
        forward = explainer.forward(pixels)
        if target is None:
            probabilities = forward.probabilities(self.card.task)
            [top, *_] = (
                self._own_tags(probabilities, 1, None, view)[0]
                or self._own_tags(probabilities, 1, 0.0, view)[0]
            )
            target = self.target(top.label, view)
        return explainer.heatmap(forward, target)

    def person_heatmap(self, pixels: torch.Tensor) -> Heatmap | None:
        """Where a person with no face shows, for uint8 (3, crop, crop) ``pixels``: the heatmap
        of the category that gave ``person`` (:meth:`person_category`), or None where none did.
        Thread-safe, like :meth:`explain`."""
        if self.vocabulary is None:
            return None
        explainer = self.explainer()
        forward = explainer.forward(pixels)
        rolled = self.vocabulary.roll_up(forward.probabilities(self.card.task), self.card.task)
        category = self.person_category(rolled)
        if category is None:
            return None
        return explainer.heatmap(forward, self.target(category.label))

    def write_overlay(
        self, data: bytes, path: str | Path, tag: str | None = None, view: View = "tags"
    ) -> Heatmap:
        """Photo bytes -> the heatmap of ``tag`` (default: the top tag) drawn on the photo, as a
        PNG written atomically to ``path``; returns the heatmap."""
        image = self.photo(data)
        heatmap = self.explain(self.crop(image), tag, view)
        write_overlay(path, image, heatmap, self.card.preprocess)
        return heatmap

    # ---- all at once

    def tag(
        self, data: bytes, top_k: int = 5, threshold: float | None = None, view: View = "tags"
    ) -> list[Tag]:
        """Photo bytes -> tags, in one call (one photo, one forward pass)."""
        prepared = self.prepare(data)
        scores = self.outputs(prepared.pixels[None]).unbind()[0]
        return self.tags(scores, top_k, threshold, view, prepared.people)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Forward passes on blank batches (one per size: cuDNN picks its kernels per shape), so
        the first real requests pay no start-up cost."""
        crop = self.card.preprocess.crop
        views = (1 + self.regions,) if self.regions else ()
        for size in batch_sizes:
            self.probabilities(torch.zeros(size, *views, 3, crop, crop, dtype=torch.uint8))
        log.info(
            "model %s version %s ready on %s (backend %s, %s)",
            self.card_name,
            self.version,
            self.device,
            self.backend,
            self.precision,
        )
