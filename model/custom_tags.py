"""Custom tags: a person's own tags, taught from a few example photos and served in the same
forward pass as the checkpoint's classifier.

A served model is a backbone plus heads: the checkpoint's classifier and any number of custom
tags. A custom tag is a linear logistic head on what the backbone already computes for every
photo (:func:`head_inputs`), with its own threshold. All heads of a model are stacked into one
(D, K) matrix (:class:`CustomHeads`), so K tags cost one small matrix multiply per batch.

A tag is stored as its examples' inputs (never the photos) plus the fitted head, in one small
``.safetensors`` file with JSON metadata, ``<store>/<model id>/<name>.safetensors``, written
atomically. It is tied to the backbone's version (:func:`model.checkpoint.backbone_version`):
when the backbone changes, the stored inputs no longer describe the photos, and the tag is
*stale* (listed, not served) until it is taught again from its photos.

Fitting (:func:`fit`): logistic regression by L-BFGS on the positives against the user's
negatives and the *built-in negatives*: one prototype per class of the checkpoint's classifier
(a photo the classifier is 90% sure is that class), minus the classes the positives themselves
look like. The threshold and the precision/recall estimate come from cross-validation on the
examples. bench/custom_tags_bench.py measures the choices (bench/README.md).
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

log = logging.getLogger("phototag.custom_tags")

FORMAT_VERSION = 1
METADATA_KEY = "phototag_custom_tag"
SUFFIX = ".safetensors"
# A tag's name is its file name and a URL path segment: lower-case letters, digits, "-" and "_",
# starting with a letter or digit (no dots, slashes or hidden files), at most 48 characters.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
_NAME = re.compile(NAME_PATTERN)
# What a head reads: "probabilities" is the square root of the classifier's class probabilities
# (a unit vector: the Hellinger embedding of the class distribution). The built-in negatives are
# exact points of that space, where in the pooled features they are not (bench/README.md).
SPACE = "sqrt_probabilities"
PROTOTYPE_PEAK = 0.9  # a built-in negative: a photo the classifier gives this much to one class
PROTOTYPE_DROP = 0.05  # classes the positives average this much on are not negatives
L2 = 1e-3  # weight decay of the logistic head, on unit-norm inputs
DEFAULT_THRESHOLD = 0.5
MIN_THRESHOLD, MAX_THRESHOLD = 0.3, 0.9  # a fitted threshold stays in this range


class CustomTagError(ValueError):
    """A custom tag cannot be taught, read or found; ``code`` is stable, the message is for a
    person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


def head_inputs(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, C) class probabilities -> (B, C) unit vectors the heads read: sqrt(p)."""
    return probabilities.clamp_min(0).sqrt()


def prototypes(num_classes: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The built-in negatives, as head inputs: one per class not in ``exclude`` (a (C,) bool),
    each a class distribution with :data:`PROTOTYPE_PEAK` on its class and the rest spread."""
    rest = (1 - PROTOTYPE_PEAK) / max(1, num_classes - 1)
    probabilities = torch.full((num_classes, num_classes), rest)
    probabilities.fill_diagonal_(PROTOTYPE_PEAK)
    if exclude is not None:
        probabilities = probabilities[~exclude]
    return head_inputs(probabilities)


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
    positives: torch.Tensor, negatives: torch.Tensor, builtin: bool
) -> tuple[torch.Tensor, float, int]:
    """Positives (P, C) and user negatives (N, C) as class probabilities -> w, b and the number
    of built-in negatives used. Each group (positives, user negatives, built-in negatives) has
    the same total weight, so five positives count as much as a thousand prototypes."""
    groups = [(head_inputs(positives), 1.0)]
    if len(negatives):
        groups.append((head_inputs(negatives), 0.0))
    used = 0
    if builtin or not len(negatives):
        exclude = positives.mean(0) >= PROTOTYPE_DROP  # the classes the positives look like
        protos = prototypes(positives.shape[1], exclude)
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
    positives: torch.Tensor, negatives: torch.Tensor, *, builtin: bool = True, folds: int = 5
) -> Fit:
    """Fit a tag on its examples' class probabilities: (P, C) positives, (N, C) negatives.

    The threshold: with user negatives, the one of best F1 on the out-of-fold scores (never
    under 0.5's neighbourhood of chance: clamped to [0.3, 0.9]); without, halfway between 0.5
    and the median out-of-fold positive score (0.5 with a single positive). The estimate:
    out-of-fold precision and recall at that threshold (``folds``-fold, fewer when there are
    fewer examples; leave-one-out below ``folds``)."""
    if not len(positives):
        raise CustomTagError("no_positives", "a tag needs at least one positive example")
    k = min(folds, len(positives), len(negatives) if len(negatives) else len(positives))
    threshold, estimate = DEFAULT_THRESHOLD, Estimate(None, None, 0)
    if k >= 2:
        pos_scores = torch.empty(len(positives))
        neg_scores = torch.empty(len(negatives))
        pos_folds, neg_folds = _folds(len(positives), k), _folds(len(negatives), k)
        for held_pos, held_neg in zip(pos_folds, neg_folds, strict=True):
            keep_pos = torch.ones(len(positives), dtype=torch.bool)
            keep_pos[held_pos] = False
            keep_neg = torch.ones(len(negatives), dtype=torch.bool)
            keep_neg[held_neg] = False
            w, b, _ = _fit_head(positives[keep_pos], negatives[keep_neg], builtin)
            pos_scores[held_pos] = torch.sigmoid(head_inputs(positives[held_pos]) @ w + b)
            neg_scores[held_neg] = torch.sigmoid(head_inputs(negatives[held_neg]) @ w + b)
        if len(negatives):
            threshold = _best_f1_threshold(pos_scores, neg_scores)
        else:
            threshold = _midpoint_threshold(pos_scores)
        estimate = _estimate(pos_scores, neg_scores, threshold, k)
    w, b, used = _fit_head(positives, negatives, builtin)
    return Fit(w, b, threshold, estimate, used)


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
    """A taught tag: its examples (as class probabilities), its head, its provenance."""

    name: str
    backbone: str  # the backbone version its examples were computed with
    positives: torch.Tensor  # (P, C) class probabilities of the positive examples
    negatives: torch.Tensor  # (N, C)
    weight: torch.Tensor  # (C,)
    bias: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    estimate: Estimate = field(default_factory=lambda: Estimate(None, None, 0))
    builtin_negatives: int = 0
    # per example, where it came from: a file path (phototag teach, which can re-read it) or
    # null (an upload); positives first, in the order of the tensors
    sources: list[str | None] = field(default_factory=list)
    space: str = SPACE
    created_at: str = field(default_factory=lambda: _now())
    updated_at: str = field(default_factory=lambda: _now())

    @classmethod
    def new(cls, name: str, backbone: str, num_classes: int) -> CustomTag:
        empty = torch.zeros(0, num_classes)
        return cls(check_name(name), backbone, empty, empty.clone(), torch.zeros(num_classes))

    def add(
        self,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        *,
        positive_sources: Sequence[str | None] = (),
        negative_sources: Sequence[str | None] = (),
    ) -> None:
        """Append examples (class probabilities) and their sources (None where unknown)."""
        pos_sources = self.sources[: len(self.positives)]
        neg_sources = self.sources[len(self.positives) :]
        pos_sources += list(positive_sources) or [None] * len(positives)
        neg_sources += list(negative_sources) or [None] * len(negatives)
        self.positives = torch.cat([self.positives, positives.float()])
        self.negatives = torch.cat([self.negatives, negatives.float()])
        self.sources = pos_sources + neg_sources

    def refit(self, builtin: bool = True) -> None:
        result = fit(self.positives, self.negatives, builtin=builtin)
        self.weight, self.bias, self.threshold = result.weight, result.bias, result.threshold
        self.estimate, self.builtin_negatives = result.estimate, result.builtin_negatives
        self.updated_at = _now()

    def stale(self, backbone: str) -> bool:
        return self.backbone != backbone or self.space != SPACE

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
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    # the file

    def to_bytes(self) -> bytes:
        tensors = {
            "positives": self.positives.contiguous(),
            "negatives": self.negatives.contiguous(),
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
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {header.get('format_version')!r}")
            estimate = Estimate(**header["estimate"])
            return cls(
                name=check_name(header["name"]),
                backbone=str(header["backbone"]),
                positives=tensors["positives"].float(),
                negatives=tensors["negatives"].float(),
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
    """The served custom tags of one model, stacked: one (C, K) matrix multiply scores them all.
    Immutable: a change builds a new one, swapped in whole (a batch sees old or new, never a
    mix)."""

    names: tuple[str, ...] = ()
    weight: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (C, K)
    bias: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (K,)
    thresholds: tuple[float, ...] = ()

    @classmethod
    def of(cls, tags: Sequence[CustomTag]) -> CustomHeads:
        return cls._of_columns([(t.name, t.weight, t.bias, t.threshold) for t in tags])

    def __len__(self) -> int:
        return len(self.names)

    def columns(self) -> list[tuple[str, torch.Tensor, float, float]]:
        return [
            (name, self.weight[:, i], float(self.bias[i]), self.thresholds[i])
            for i, name in enumerate(self.names)
        ]

    @classmethod
    def _of_columns(cls, columns: list[tuple[str, torch.Tensor, float, float]]) -> CustomHeads:
        if not columns:
            return cls()
        columns = sorted(columns, key=lambda c: c[0])
        return cls(
            names=tuple(c[0] for c in columns),
            weight=torch.stack([c[1] for c in columns], dim=1),
            bias=torch.tensor([c[2] for c in columns]),
            thresholds=tuple(c[3] for c in columns),
        )

    def with_tag(self, tag: CustomTag) -> CustomHeads:
        """These heads with ``tag``'s added or replaced (a new object)."""
        kept = [c for c in self.columns() if c[0] != tag.name]
        return self._of_columns([*kept, (tag.name, tag.weight, tag.bias, tag.threshold)])

    def without(self, name: str) -> CustomHeads:
        return self._of_columns([c for c in self.columns() if c[0] != name])

    def probabilities(self, class_probabilities: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities -> (B, K) custom-tag probabilities."""
        if not self.names:
            return class_probabilities.new_zeros(len(class_probabilities), 0)
        return torch.sigmoid(head_inputs(class_probabilities) @ self.weight + self.bias)


# ---- corrections of vocabulary tags

SUPPRESSION_SIMILARITY = 0.8  # cosine of pooled features: the same photo or a near copy (bench)
SUPPRESSIONS_FILE = "_suppressions.safetensors"  # "_": never a tag's name


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
            "format_version": FORMAT_VERSION,
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
