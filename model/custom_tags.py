"""Custom tags: a person's own tags, taught from a few example photos and served in the same
forward pass as the checkpoint's classifier.

A served model is a backbone plus heads: the checkpoint's classifier and any number of custom
tags. A custom tag is a linear logistic head on what the backbone already computes for every
photo (:class:`Space`: the class probabilities, the pooled and the mid-level features), with its own
threshold. All heads of a model are stacked into one (D, K) matrix (:class:`CustomHeads`), so K
tags cost one small matrix multiply per batch.

A tag is stored as its examples (:class:`Examples`: class probabilities, pooled and mid-level
features, never the photos) plus the fitted head, in one small
``.safetensors`` file with JSON metadata, ``<store>/<model id>/<name>.safetensors``, written
atomically. It is tied to the backbone's version (:func:`model.checkpoint.probabilities_version`):
when the backbone changes, the stored examples no longer describe the photos, and the tag is
*stale* (listed, not served) until it is taught again from its photos.

Fitting (:func:`fit`): logistic regression by L-BFGS on the positives against the user's
negatives and the *built-in negatives*: one prototype per class of the checkpoint's classifier
(a photo the classifier is 90% sure is that class, whose features lie that class's way from the
mean photo's), minus the classes the positives themselves look like. The threshold and the
precision/recall estimate come from cross-validation on the examples.
bench/custom_tags_bench.py measures the choices (bench/README.md).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from model.checkpoint import atomic_write_bytes
from model.errors import CodedError

log = logging.getLogger("phototag.custom_tags")

FORMAT_VERSION = 3  # 2 keeps the examples' pooled features, 3 their mid-level features too
READABLE_VERSIONS = (1, 2, 3)
METADATA_KEY = "phototag_custom_tag"
SUFFIX = ".safetensors"
# A tag's name is its file name and a URL path segment: lower-case letters, digits, "-" and "_",
# starting with a letter or digit (no dots, slashes or hidden files), at most 48 characters.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
_NAME = re.compile(NAME_PATTERN)
# What a head reads (a tag's "space"): the square root of the classifier's class probabilities
# (a unit vector: the Hellinger embedding of the class distribution); where the network's
# structure gives the mean pooled feature, the centred, unit pooled features beside them; and
# where it gives the mean mid-level feature too, the centred, unit mid-level features (layout and
# texture: what scenes are told apart by). Each part takes a share of the input's squared length.
PROBABILITIES = "sqrt_probabilities"
WITH_FEATURES = "sqrt_probabilities+features"
WITH_MID = "sqrt_probabilities+features+mid"
SPACES = (PROBABILITIES, WITH_FEATURES, WITH_MID)
SHARES = {PROBABILITIES: (1.0,), WITH_FEATURES: (0.5, 0.5), WITH_MID: (0.45, 0.45, 0.1)}
PROTOTYPE_PEAK = 0.9  # a built-in negative: a photo the classifier gives this much to one class
PROTOTYPE_DROP = 0.05  # classes the positives average this much on are not negatives
L2 = 1e-3  # weight decay of the logistic head, on unit-norm inputs
DEFAULT_THRESHOLD = 0.5
MIN_THRESHOLD, MAX_THRESHOLD = 0.3, 0.9  # a fitted threshold stays in this range


class CustomTagError(CodedError, ValueError):
    """A custom tag cannot be taught, read or found; ``code`` is stable, the message is for a
    person."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CustomTagError(
            "invalid_tag_name",
            f"{name!r} is not a tag name: use 1 to 48 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit (e.g. shrek, license-plate)",
        )
    return name


def check_model_id(model_id: str) -> str:
    if not model_id or model_id.startswith(".") or "/" in model_id or "\\" in model_id:
        raise CustomTagError("invalid_model_id", f"{model_id!r} is not a model id")
    return model_id


# ---- what the heads read


@dataclass(frozen=True)
class Examples:
    """Photos as the heads see them: (N, C) class probabilities, (N, F) pooled features and
    (N, M) mid-level features. A part is (N, 0) where it was not kept (tags written before
    phototag kept it) or the network has none."""

    probabilities: torch.Tensor
    features: torch.Tensor
    mid: torch.Tensor | None = None  # None: (N, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "probabilities", self.probabilities.float())
        object.__setattr__(self, "features", self.features.float())
        mid = self.mid if self.mid is not None else torch.zeros(len(self.probabilities), 0)
        object.__setattr__(self, "mid", mid.float())

    @classmethod
    def empty(cls, num_classes: int, num_features: int = 0, num_mid: int = 0) -> Examples:
        return cls(
            torch.zeros(0, num_classes), torch.zeros(0, num_features), torch.zeros(0, num_mid)
        )

    @classmethod
    def of(cls, scores: Sequence[Any]) -> Examples:
        """The photos of :class:`model.tagger.Scores` (a batch's, or one photo's each)."""
        sets = [s.examples for s in scores]
        return cls(
            torch.cat([e.probabilities for e in sets]),
            torch.cat([e.features for e in sets]),
            torch.cat([e.mid for e in sets]),
        )

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, index: torch.Tensor | slice) -> Examples:
        return Examples(self.probabilities[index], self.features[index], self.mid[index])

    def __add__(self, other: Examples) -> Examples:
        """Both, in order; each part only where both sets have it (an empty set has all)."""
        if not len(other):
            return self
        if not len(self):
            return other

        def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if a.shape[1] == b.shape[1]:
                return torch.cat([a, b])
            return torch.zeros(len(a) + len(b), 0)

        return Examples(
            torch.cat([self.probabilities, other.probabilities]),
            joined(self.features, other.features),
            joined(self.mid, other.mid),
        )

    @property
    def has_features(self) -> bool:
        return self.features.shape[1] > 0 or not len(self)

    @property
    def has_mid(self) -> bool:
        return self.mid.shape[1] > 0 or not len(self)


@dataclass(frozen=True)
class Space:
    """What one model's heads read. Always the square root of the class probabilities; where
    the network gives the mean pooled feature (:func:`model.architectures.pooled_feature_mean`),
    also the pooled features minus that mean, normalised; where it gives the mean mid-level
    feature (:func:`model.architectures.mid_level_mean`), also the mid-level features minus that
    mean, normalised; each part scaled to its share of :data:`SHARES`.
    The built-in negatives are points of it: a class's prototype is its peaked distribution, its
    classifier row (minus the mean row) as the feature direction, and the mean photo's mid-level
    features (zero). The features separate concepts the classifier has no class for better than
    its probabilities alone, and the mid-level ones scenes (bench/README.md)."""

    center: torch.Tensor | None = None  # (F,) the mean pooled feature
    directions: torch.Tensor | None = None  # (C, F) unit: each class's row minus the mean row
    mid_center: torch.Tensor | None = None  # (M,) the mean mid-level feature

    @classmethod
    def of(cls, net) -> Space:
        """The space of a :class:`model.architectures.TaggerNet`."""
        from model.architectures import mid_level_mean, pooled_feature_mean

        center = pooled_feature_mean(net)
        if center is None:
            return cls()
        rows = net.head[-1].weight.detach().float().cpu()
        mid_center = mid_level_mean(net)
        return cls(
            center.cpu(),
            F.normalize(rows - rows.mean(0), dim=1),
            None if mid_center is None else mid_center.cpu(),
        )

    @property
    def name(self) -> str:
        if self.center is None:
            return PROBABILITIES
        return WITH_FEATURES if self.mid_center is None else WITH_MID

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(share**0.5 for share in SHARES[self.name])

    def for_examples(self, *sets: Examples) -> Space:
        """This space, or the largest part of it that every example was kept with."""
        if not all(s.has_features for s in sets):
            return Space()
        if not all(s.has_mid for s in sets):
            return Space(self.center, self.directions)
        return self

    def inputs(self, examples: Examples) -> torch.Tensor:
        """Examples -> (N, D) unit vectors the heads read."""
        parts = [examples.probabilities.clamp_min(0).sqrt()]
        for part, center in ((examples.features, self.center), (examples.mid, self.mid_center)):
            if center is None:
                continue
            if len(examples):
                parts.append(F.normalize(part - center, dim=1))
            else:  # none: whatever they were made with
                parts.append(part.new_zeros(0, len(center)))
        return self._scaled(parts)

    def prototypes(self, num_classes: int, exclude: torch.Tensor) -> torch.Tensor:
        """The built-in negatives as inputs: one per class not in ``exclude`` (a (C,) bool), a
        class distribution with :data:`PROTOTYPE_PEAK` on its class and the rest spread."""
        rest = (1 - PROTOTYPE_PEAK) / max(1, num_classes - 1)
        probabilities = torch.full((num_classes, num_classes), rest)
        probabilities.fill_diagonal_(PROTOTYPE_PEAK)
        parts = [probabilities[~exclude].sqrt()]
        if self.directions is not None:
            parts.append(self.directions[~exclude])
        if self.mid_center is not None:
            parts.append(torch.zeros(len(parts[0]), len(self.mid_center)))
        return self._scaled(parts)

    def _scaled(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This space's parts of some photos, each scaled to its share, side by side."""
        return torch.cat([part * scale for part, scale in zip(parts, self.scales, strict=True)], 1)

    def widths(self, num_classes: int) -> tuple[int, ...]:
        """Each part's width: class probabilities, then those of the features this space has."""
        centers = [c for c in (self.center, self.mid_center) if c is not None]
        return (num_classes, *(len(c) for c in centers))

    def weight_of(self, weight: torch.Tensor, space: str) -> torch.Tensor:
        """A head's weight, fitted in ``space``, over this space's inputs: a head fitted in a
        smaller space (before the features were kept) reads the same numbers here, each part
        scaled back to its old share, and nothing of the parts it never saw."""
        if space not in SPACES:
            raise ValueError(f"a head of the unknown space {space!r} cannot be served")
        if space == self.name and self.directions is None:
            return weight
        old = SHARES[space]
        if len(old) > len(self.scales):
            raise ValueError(f"a {space} head cannot be served on {self.name}")
        classes = len(weight) if self.directions is None else len(self.directions)
        widths = self.widths(classes)
        if len(weight) != sum(widths[: len(old)]):
            raise ValueError(f"a {space} head of {len(weight)} weights does not fit")
        parts = list(weight.split(list(widths[: len(old)])))
        parts = [p * (o**0.5 / s) for p, o, s in zip(parts, old, self.scales, strict=False)]
        parts += [weight.new_zeros(w) for w in widths[len(old) :]]
        return torch.cat(parts)


# ---- fitting


@dataclass(frozen=True)
class Estimate:
    """Precision and recall of a tag at its threshold, from cross-validation on its examples.
    Precision is None without negatives of the user's (the built-in ones are not photos)."""

    precision: float | None
    recall: float | None
    folds: int

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "recall": self.recall, "folds": self.folds}


@dataclass(frozen=True)
class Fit:
    weight: torch.Tensor  # (D,)
    bias: float
    threshold: float
    estimate: Estimate
    builtin_negatives: int
    space: str


def _logistic(
    inputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, l2: float = L2
) -> tuple[torch.Tensor, float]:
    """Weighted L2-regularised logistic regression by L-BFGS: (N, D), (N,) 0/1, (N,) -> w, b."""
    w = torch.zeros(inputs.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=100, line_search_fn="strong_wolfe")
    total = weights.sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = F.binary_cross_entropy_with_logits(inputs @ w + b, labels, reduction="none")
        loss = (losses * weights).sum() / total + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), float(b.detach())


def _fit_head(
    positives: Examples, negatives: Examples, builtin: bool, space: Space
) -> tuple[torch.Tensor, float, int]:
    """Positives and user negatives -> w, b and the number of built-in negatives used. Each
    group (positives, user negatives, built-in negatives) has the same total weight, so five
    positives count as much as a thousand prototypes."""
    groups = [(space.inputs(positives), 1.0)]
    if len(negatives):
        groups.append((space.inputs(negatives), 0.0))
    used = 0
    if builtin or not len(negatives):
        # the classes the positives look like are no negatives
        exclude = positives.probabilities.mean(0) >= PROTOTYPE_DROP
        protos = space.prototypes(positives.probabilities.shape[1], exclude)
        used = len(protos)
        groups.append((protos, 0.0))
    groups = [(g, y) for g, y in groups if len(g)]  # a small model's classes may all be excluded
    inputs = torch.cat([g for g, _ in groups])
    labels = torch.cat([torch.full((len(g),), y) for g, y in groups])
    weights = torch.cat([torch.full((len(g),), 1.0 / len(g)) for g, _ in groups])
    w, b = _logistic(inputs, labels, weights)
    return w, b, used


def _folds(count: int, k: int) -> list[torch.Tensor]:
    return [torch.arange(count)[i::k] for i in range(k)]


def fit(
    positives: Examples,
    negatives: Examples,
    space: Space | None = None,
    *,
    builtin: bool = True,
    folds: int = 5,
) -> Fit:
    """Fit a tag on its examples in ``space`` (default: the probabilities only), or in the part
    of it every example was kept with (:meth:`Space.for_examples`: no mid-level features, or no
    features at all, in tags written before phototag kept them).

    The threshold: with two or more user negatives, the one of best F1 on the out-of-fold scores
    (never under 0.5's neighbourhood of chance: clamped to [0.3, 0.9]); with fewer, halfway
    between 0.5 and the (lower) median out-of-fold positive score (0.5 with a single positive).
    The estimate: out-of-fold precision and recall at that threshold (``folds``-fold, fewer when
    there are fewer examples; leave-one-out below ``folds``). A single negative is in every
    fold's training and tested in none: precision needs two."""
    if not len(positives):
        raise CustomTagError("no_positives", "a tag needs at least one positive example")
    space = (space or Space()).for_examples(positives, negatives)
    tested = negatives if len(negatives) >= 2 else negatives[:0]  # negatives held out in turn
    k = min(folds, len(positives), len(tested) if len(tested) else len(positives))
    threshold, estimate = DEFAULT_THRESHOLD, Estimate(None, None, 0)
    if k >= 2:
        pos_scores = torch.empty(len(positives))
        neg_scores = torch.empty(len(tested))
        pos_folds, neg_folds = _folds(len(positives), k), _folds(len(tested), k)
        for held_pos, held_neg in zip(pos_folds, neg_folds, strict=True):
            keep_pos = torch.ones(len(positives), dtype=torch.bool)
            keep_pos[held_pos] = False
            keep_neg = torch.ones(len(negatives), dtype=torch.bool)
            keep_neg[held_neg] = False  # none when the negatives are not tested
            w, b, _ = _fit_head(positives[keep_pos], negatives[keep_neg], builtin, space)
            pos_scores[held_pos] = torch.sigmoid(space.inputs(positives[held_pos]) @ w + b)
            neg_scores[held_neg] = torch.sigmoid(space.inputs(tested[held_neg]) @ w + b)
        if len(tested):
            threshold = _best_f1_threshold(pos_scores, neg_scores)
        else:
            threshold = _midpoint_threshold(pos_scores)
        estimate = _estimate(pos_scores, neg_scores, threshold, k)
    w, b, used = _fit_head(positives, negatives, builtin, space)
    return Fit(w, b, threshold, estimate, used, space.name)


def _best_f1_threshold(pos: torch.Tensor, neg: torch.Tensor) -> float:
    candidates = torch.linspace(MIN_THRESHOLD, MAX_THRESHOLD, 25)
    f1 = torch.stack([_f1(pos, neg, float(t)) for t in candidates])
    best = f1.max()
    # among equally good thresholds, the middle one: least sensitive to the next photo
    ties = candidates[f1 >= best - 1e-9]
    return round(float(ties[len(ties) // 2]), 4)


def _midpoint_threshold(pos: torch.Tensor) -> float:
    """Without negatives of the user's: halfway between 0.5 and a typical unseen positive's
    score (the median out-of-fold one), never under 0.5. The head is fitted against the
    built-in prototypes, which real photos of other things are nearer to the positives than,
    so 0.5 tags too much; a positive the head has not seen shows how far above 0.5 the concept
    sits (bench/README.md measures the rule)."""
    middle = (DEFAULT_THRESHOLD + float(pos.median())) / 2
    return round(min(MAX_THRESHOLD, max(DEFAULT_THRESHOLD, middle)), 4)


def _f1(pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> torch.Tensor:
    tp = (pos >= threshold).sum()
    fp = (neg >= threshold).sum()
    return 2 * tp / (len(pos) + tp + fp).clamp_min(1)


def _estimate(pos: torch.Tensor, neg: torch.Tensor, threshold: float, folds: int) -> Estimate:
    tp = int((pos >= threshold).sum())
    fp = int((neg >= threshold).sum())
    precision = round(tp / (tp + fp), 4) if len(neg) and tp + fp else None
    if len(neg) and not tp + fp:
        precision = 1.0  # nothing returned: no wrong answer among them
    return Estimate(precision, round(tp / len(pos), 4), folds)


# ---- a tag, its file and the store


@dataclass
class CustomTag:
    """A taught tag: its examples, its head, its provenance."""

    name: str
    backbone: str  # the backbone version its examples were computed with
    positives: Examples
    negatives: Examples
    weight: torch.Tensor  # (D,) over the inputs of ``space``
    bias: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    estimate: Estimate = field(default_factory=lambda: Estimate(None, None, 0))
    builtin_negatives: int = 0
    # per example, where it came from: a file path (phototag teach, which can re-read it) or
    # null (an upload); positives first, in the order of the tensors
    sources: list[str | None] = field(default_factory=list)
    space: str = PROBABILITIES
    created_at: str = field(default_factory=lambda: _now())
    updated_at: str = field(default_factory=lambda: _now())

    @classmethod
    def new(
        cls, name: str, backbone: str, num_classes: int, num_features: int = 0, num_mid: int = 0
    ) -> CustomTag:
        empty = Examples.empty(num_classes, num_features, num_mid)
        return cls(check_name(name), backbone, empty, empty, torch.zeros(num_classes))

    def add(
        self,
        positives: Examples,
        negatives: Examples,
        *,
        positive_sources: Sequence[str | None] = (),
        negative_sources: Sequence[str | None] = (),
    ) -> None:
        """Append examples and their sources (None where unknown)."""
        pos_sources = self.sources[: len(self.positives)]
        neg_sources = self.sources[len(self.positives) :]
        pos_sources += list(positive_sources) or [None] * len(positives)
        neg_sources += list(negative_sources) or [None] * len(negatives)
        self.positives = self.positives + positives
        self.negatives = self.negatives + negatives
        self.sources = pos_sources + neg_sources

    def refit(self, space: Space | None = None, builtin: bool = True) -> None:
        result = fit(self.positives, self.negatives, space, builtin=builtin)
        self.weight, self.bias, self.threshold = result.weight, result.bias, result.threshold
        self.estimate, self.builtin_negatives = result.estimate, result.builtin_negatives
        self.space = result.space
        self.updated_at = _now()

    def stale(self, backbone: str) -> bool:
        return self.backbone != backbone or self.space not in SPACES

    def current(self, backbone: str, space: Space) -> bool:
        """Not stale, and reading all that ``space`` offers (a tag kept without features in a
        model whose heads read them is served, but would gain from its photos read again)."""
        return not self.stale(backbone) and self.space == space.name

    def info(self, backbone: str | None = None) -> dict[str, Any]:
        """What the API and the CLI report of a tag."""
        return {
            "name": self.name,
            "positives": len(self.positives),
            "negatives": len(self.negatives),
            "builtin_negatives": self.builtin_negatives,
            "threshold": self.threshold,
            "estimate": self.estimate.to_dict(),
            "backbone": self.backbone,
            "stale": backbone is not None and self.stale(backbone),
            "space": self.space,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    # the file

    def to_bytes(self) -> bytes:
        tensors = {
            "positives": self.positives.probabilities.contiguous(),
            "negatives": self.negatives.probabilities.contiguous(),
            "positive_features": self.positives.features.contiguous(),
            "negative_features": self.negatives.features.contiguous(),
            "positive_mid": self.positives.mid.contiguous(),
            "negative_mid": self.negatives.mid.contiguous(),
            "weight": self.weight.contiguous(),
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "backbone": self.backbone,
            "space": self.space,
            "bias": self.bias,
            "threshold": self.threshold,
            "estimate": self.estimate.to_dict(),
            "builtin_negatives": self.builtin_negatives,
            "sources": self.sources,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        return save_safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "") -> CustomTag:
        try:
            tensors = load_safetensors_bytes(data)
            header = json.loads(_metadata(data)[METADATA_KEY])
            if header.get("format_version") not in READABLE_VERSIONS:
                raise ValueError(f"format version {header.get('format_version')!r}")
            estimate = Estimate(**header["estimate"])
            return cls(
                name=check_name(header["name"]),
                backbone=str(header["backbone"]),
                positives=_examples(tensors, "positive"),
                negatives=_examples(tensors, "negative"),
                weight=tensors["weight"].float(),
                bias=float(header["bias"]),
                threshold=float(header["threshold"]),
                estimate=estimate,
                builtin_negatives=int(header.get("builtin_negatives", 0)),
                sources=list(header.get("sources", [])),
                space=str(header.get("space", "")),
                created_at=str(header.get("created_at", "")),
                updated_at=str(header.get("updated_at", "")),
            )
        except CustomTagError:
            raise
        except Exception as exc:  # a damaged or foreign file
            raise CustomTagError("invalid_tag_file", f"{where}: not a custom tag ({exc})") from None


def _examples(tensors: dict[str, torch.Tensor], kind: str) -> Examples:
    """A file's positive or negative examples; format 1 kept no features, 2 no mid-level ones."""
    probabilities = tensors[f"{kind}s"].float()
    parts = []
    for part in ("features", "mid"):
        found = tensors.get(f"{kind}_{part}", torch.zeros(len(probabilities), 0))
        if len(found) != len(probabilities):
            raise ValueError(f"{len(found)} {kind} {part} for {len(probabilities)} examples")
        parts.append(found)
    return Examples(probabilities, *parts)


def _metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > len(data) - 8 or size > 10 * 1024 * 1024:
        raise ValueError("a broken safetensors header")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class CustomTagStore:
    """The tags of every model, one file each: ``root/<model id>/<name>.safetensors``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, model_id: str) -> Path:
        return self.root / check_model_id(model_id)

    def path(self, model_id: str, name: str) -> Path:
        return self.folder(model_id) / f"{check_name(name)}{SUFFIX}"

    def names(self, model_id: str) -> list[str]:
        folder = self.folder(model_id)
        if not folder.is_dir():
            return []
        return sorted(
            p.stem for p in folder.glob(f"*{SUFFIX}") if _NAME.match(p.stem) and p.is_file()
        )

    def exists(self, model_id: str, name: str) -> bool:
        return self.path(model_id, name).is_file()

    def load(self, model_id: str, name: str) -> CustomTag:
        path = self.path(model_id, name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CustomTagError(
                "unknown_tag", f"model {model_id!r} has no custom tag {name!r}"
            ) from None
        return CustomTag.from_bytes(data, str(path))

    def load_all(self, model_id: str) -> list[CustomTag]:
        """Every readable tag of a model; an unreadable file is logged and skipped."""
        tags = []
        for name in self.names(model_id):
            try:
                tags.append(self.load(model_id, name))
            except CustomTagError as exc:
                log.warning("skipped custom tag %s of %s: %s", name, model_id, exc.message)
        return tags

    def save(self, model_id: str, tag: CustomTag) -> Path:
        return atomic_write_bytes(self.path(model_id, tag.name), tag.to_bytes())

    def load_suppressions(self, model_id: str, backbone: str) -> Suppressions:
        """A model's corrections of vocabulary tags (none when they were made with another
        backbone, or the file is unreadable: logged)."""
        path = self.folder(model_id) / SUPPRESSIONS_FILE
        try:
            found = Suppressions.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return Suppressions(backbone=backbone)
        except Exception as exc:
            log.warning("ignored the corrections of %s (%s): %s", model_id, path, exc)
            return Suppressions(backbone=backbone)
        return found if found.backbone == backbone else Suppressions(backbone=backbone)

    def save_suppressions(self, model_id: str, suppressions: Suppressions) -> Path:
        path = self.folder(model_id) / SUPPRESSIONS_FILE
        return atomic_write_bytes(path, suppressions.to_bytes())

    def delete(self, model_id: str, name: str) -> None:
        path = self.path(model_id, name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise CustomTagError(
                "unknown_tag", f"model {model_id!r} has no custom tag {name!r}"
            ) from None


# ---- serving: every head of a model at once


@dataclass(frozen=True)
class CustomHeads:
    """The served custom tags of one model, stacked: one (D, K) matrix multiply over the
    model's :class:`Space` scores them all. Immutable: a change builds a new one, swapped in
    whole (a batch sees old or new, never a mix)."""

    space: Space = field(default_factory=Space)
    names: tuple[str, ...] = ()
    weight: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (D, K)
    bias: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (K,)
    thresholds: tuple[float, ...] = ()

    @classmethod
    def of(cls, tags: Sequence[CustomTag], space: Space) -> CustomHeads:
        """The heads of ``tags`` over ``space``; a tag whose head does not fit it is logged and
        left out (the others are served)."""
        columns = []
        for tag in tags:
            try:
                columns.append(cls._column(tag, space))
            except ValueError as exc:
                log.warning("not serving custom tag %s: %s", tag.name, exc)
        return cls(space)._with(columns)

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def _column(tag: CustomTag, space: Space) -> tuple[str, torch.Tensor, float, float]:
        return (tag.name, space.weight_of(tag.weight, tag.space), tag.bias, tag.threshold)

    def columns(self) -> list[tuple[str, torch.Tensor, float, float]]:
        return [
            (name, self.weight[:, i], float(self.bias[i]), self.thresholds[i])
            for i, name in enumerate(self.names)
        ]

    def _with(self, columns: list[tuple[str, torch.Tensor, float, float]]) -> CustomHeads:
        if not columns:
            return CustomHeads(self.space)
        columns = sorted(columns, key=lambda c: c[0])
        return CustomHeads(
            space=self.space,
            names=tuple(c[0] for c in columns),
            weight=torch.stack([c[1] for c in columns], dim=1),
            bias=torch.tensor([c[2] for c in columns]),
            thresholds=tuple(c[3] for c in columns),
        )

    def with_tag(self, tag: CustomTag) -> CustomHeads:
        """These heads with ``tag``'s added or replaced (a new object)."""
        kept = [c for c in self.columns() if c[0] != tag.name]
        return self._with([*kept, self._column(tag, self.space)])

    def without(self, name: str) -> CustomHeads:
        return self._with([c for c in self.columns() if c[0] != name])

    def probabilities(self, photos: Examples) -> torch.Tensor:
        """B photos -> (B, K) custom-tag probabilities."""
        if not self.names:
            return photos.probabilities.new_zeros(len(photos), 0)
        inputs = self.space.inputs(photos)
        return torch.sigmoid(inputs @ self.weight + self.bias)


# ---- corrections of vocabulary tags

SUPPRESSION_SIMILARITY = 0.8  # cosine of pooled features: the same photo or a near copy (bench)
SUPPRESSIONS_FILE = "_suppressions.safetensors"  # "_": never a tag's name
SUPPRESSIONS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Suppressions:
    """Vocabulary tags a person marked wrong, each on a photo: the tag is not returned for a
    photo whose pooled features are at least :data:`SUPPRESSION_SIMILARITY` cosine-similar to
    that photo's (the same photo re-uploaded, resized or re-encoded; a burst of near copies),
    and is for every other photo. Immutable: a change builds a new one."""

    features: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (M, F) unit
    labels: tuple[str, ...] = ()
    backbone: str = ""
    similarity: float = SUPPRESSION_SIMILARITY

    def __len__(self) -> int:
        return len(self.labels)

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """(F,) one photo's pooled features -> (M,) cosine to each marked photo."""
        if not self.labels:
            return torch.zeros(0)
        return self.features @ F.normalize(features.float(), dim=0)

    def suppressed(self, features: torch.Tensor) -> set[str]:
        if not self.labels:
            return set()
        near = self.similarities(features) >= self.similarity
        return {label for label, hit in zip(self.labels, near.tolist(), strict=True) if hit}

    def wrong(self, features: torch.Tensor, label: str, backbone: str) -> Suppressions:
        """With ``label`` marked wrong on the photo of ``features`` (F,)."""
        unit = F.normalize(features.float(), dim=0)[None]
        kept = self if self.backbone == backbone else Suppressions(backbone=backbone)
        stacked = torch.cat([kept.features.reshape(-1, unit.shape[1]), unit])
        return Suppressions(stacked, (*kept.labels, label), backbone, self.similarity)

    def right(self, features: torch.Tensor, label: str) -> Suppressions:
        """Without the marks of ``label`` on photos similar to ``features``: marked right."""
        if not self.labels:
            return self
        near = self.similarities(features) >= self.similarity
        keep = [i for i, lab in enumerate(self.labels) if not (lab == label and near[i])]
        return Suppressions(
            self.features[keep], tuple(self.labels[i] for i in keep), self.backbone, self.similarity
        )

    def to_bytes(self) -> bytes:
        meta = {
            "format_version": SUPPRESSIONS_FORMAT_VERSION,
            "labels": list(self.labels),
            "backbone": self.backbone,
        }
        return save_safetensors_bytes(
            {"features": self.features.contiguous()}, metadata={METADATA_KEY: json.dumps(meta)}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Suppressions:
        tensors = load_safetensors_bytes(data)
        meta = json.loads(_metadata(data)[METADATA_KEY])
        labels = tuple(str(label) for label in meta["labels"])
        if len(labels) != len(tensors["features"]):
            raise ValueError("as many labels as photos")
        return cls(tensors["features"].float(), labels, str(meta["backbone"]))
