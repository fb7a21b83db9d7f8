"""Tags people want: a vocabulary maps a network's classes to tags in a shallow tree.

Each tag has a label in everyday words, its path from a top category down (``animal/cat``), a
threshold, and the classes it gathers: its own and all its descendants'. Probabilities roll up
the tree: for a single-label (softmax) model a tag's probability is the sum of its classes'
(a cat split over three breeds is "cat 0.86", not three tags under a threshold); for a
multi-label (sigmoid) model, whose per-class probabilities are not exclusive, it is the largest
of its classes' (the probability of the likeliest one, a lower bound of "any of them").

A tag may also count classes as evidence (``evidence``): classes assigned to other tags that
together show a scene or a place (a fridge, a stove and a microwave: "kitchen"). Its probability
sums those as well, so a class can count towards its own tag and towards scenes.

A photo gets its most specific confident tags: every tag at or above its threshold whose
descendants are all below theirs ("cat", not also "animal"; "bird" when no species is sure).
A tag may have a second threshold for the whole photo read alone (``whole_threshold``): the
first is for what is served by default, the whole photo merged with its regions
(:mod:`model.regions`), where a tag is likelier; each is fitted for what it reads.
The vocabulary travels in the checkpoint's card; a checkpoint without one has its classes as
tags. Hidden classes are noise for photo tagging: no tag gathers them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

import torch

SEPARATOR = "/"


class VocabularyError(ValueError):
    """A vocabulary that does not fit its classes; the message says what is wrong."""


@dataclass(frozen=True)
class VocabularyTag:
    label: str
    path: tuple[str, ...]  # from the top category down; the last element is the label
    threshold: float
    classes: tuple[str, ...]  # the network classes assigned to this tag itself
    evidence: tuple[str, ...] = ()  # classes of other tags that count towards this one too
    whole_threshold: float | None = None  # for the whole photo alone; None: ``threshold``

    def threshold_for(self, whole: bool) -> float:
        """Its threshold for probabilities of the whole photo alone, or merged with regions."""
        return (
            self.whole_threshold if whole and self.whole_threshold is not None else self.threshold
        )


@dataclass(frozen=True)
class Scored:
    """A tag with its probability for one photo."""

    label: str
    probability: float
    path: tuple[str, ...]


class Vocabulary:
    """A validated tag tree over ``classes`` (the network's, in logit order)."""

    def __init__(
        self,
        tags: Sequence[VocabularyTag],
        classes: Sequence[str],
        hidden: Sequence[str] = (),
        name: str = "",
    ) -> None:
        self.tags = list(tags)
        self.classes = list(classes)
        self.hidden = list(hidden)
        self.name = name
        self._check()

    # ---- the card's JSON

    @classmethod
    def from_dict(cls, data: dict[str, Any], classes: Sequence[str]) -> Vocabulary:
        try:
            tags = [
                VocabularyTag(
                    str(t["label"]),
                    tuple(str(p) for p in t["path"]),
                    float(t.get("threshold", 0.5)),
                    tuple(str(c) for c in t.get("classes", ())),
                    tuple(str(c) for c in t.get("evidence", ())),
                    None if t.get("whole_threshold") is None else float(t["whole_threshold"]),
                )
                for t in data["tags"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise VocabularyError(f"a vocabulary tag is malformed: {exc!r}") from None
        return cls(tags, classes, data.get("hidden", ()), str(data.get("name", "")))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tags": [
                {
                    "label": t.label,
                    "path": list(t.path),
                    "threshold": t.threshold,
                    "classes": list(t.classes),
                    **({"evidence": list(t.evidence)} if t.evidence else {}),
                    **(
                        {"whole_threshold": t.whole_threshold}
                        if t.whole_threshold is not None
                        else {}
                    ),
                }
                for t in self.tags
            ],
            "hidden": list(self.hidden),
        }

    @classmethod
    def from_paths(
        cls, paths: dict[str, str], classes: Sequence[str], threshold: float = 0.5
    ) -> Vocabulary:
        """A vocabulary from ``class -> "category/.../tag"`` paths (a manifest's tags): each class
        is the tag at its path; every prefix is a parent tag."""
        direct: dict[tuple[str, ...], list[str]] = {}
        for name, path in paths.items():
            direct.setdefault(tuple(path.split(SEPARATOR)), []).append(name)
        nodes = sorted({p[:i] for p in direct for i in range(1, len(p) + 1)})
        tags = [
            VocabularyTag(node[-1], node, threshold, tuple(sorted(direct.get(node, []))))
            for node in nodes
        ]
        return cls(tags, classes)

    def _check(self) -> None:
        labels = [t.label for t in self.tags]
        if not self.tags:
            raise VocabularyError("a vocabulary needs at least one tag")
        if len(set(labels)) != len(labels):
            twice = sorted({label for label in labels if labels.count(label) > 1})
            raise VocabularyError(f"tag labels must be unique: {', '.join(twice)}")
        known = set(self.classes)
        for tag in self.tags:
            if not tag.label or not tag.path or tag.path[-1] != tag.label:
                raise VocabularyError(f"tag {tag.label!r}: its path must end with its label")
            if len(tag.path) > 1 and tag.path[:-1] not in self._by_path:
                raise VocabularyError(
                    f"tag {tag.label!r}: its parent {SEPARATOR.join(tag.path[:-1])} is not a tag"
                )
            for value in (tag.threshold, tag.threshold_for(whole=True)):
                if not 0 <= value <= 1:
                    raise VocabularyError(f"tag {tag.label!r}: threshold {value} not in [0, 1]")
            unknown = [c for c in (*tag.classes, *tag.evidence) if c not in known]
            if unknown:
                raise VocabularyError(f"tag {tag.label!r} gathers unknown classes: {unknown[:5]}")
        assigned = [c for t in self.tags for c in t.classes]
        if len(set(assigned)) != len(assigned):
            raise VocabularyError("a class may be assigned to one tag only")
        if set(assigned) & set(self.hidden):
            raise VocabularyError("a hidden class cannot be assigned to a tag")

    # ---- the tree

    @cached_property
    def _by_path(self) -> dict[tuple[str, ...], int]:
        return {t.path: i for i, t in enumerate(self.tags)}

    @cached_property
    def gathered(self) -> list[list[int]]:
        """Per tag, the indices of the classes it gathers: its own and its descendants'."""
        index = {name: i for i, name in enumerate(self.classes)}
        result: list[set[int]] = [set() for _ in self.tags]
        for tag in self.tags:
            for depth in range(1, len(tag.path) + 1):
                result[self._by_path[tag.path[:depth]]].update(
                    index[c] for c in (*tag.classes, *tag.evidence)
                )
        return [sorted(members) for members in result]

    @cached_property
    def membership(self) -> torch.Tensor:
        """(num_classes, num_tags) 0/1: class c rolls up into tag t."""
        matrix = torch.zeros(len(self.classes), len(self.tags))
        for t, members in enumerate(self.gathered):
            matrix[members, t] = 1.0
        return matrix

    @cached_property
    def _ancestors(self) -> list[list[int]]:
        return [[self._by_path[tag.path[:d]] for d in range(1, len(tag.path))] for tag in self.tags]

    @cached_property
    def _thresholds(self) -> dict[bool, torch.Tensor]:
        return {w: torch.tensor([t.threshold_for(w) for t in self.tags]) for w in (False, True)}

    def thresholds(self, whole: bool = False) -> torch.Tensor:
        """(T,) each tag's threshold, for the whole photo alone or merged with its regions."""
        return self._thresholds[whole]

    # ---- scoring

    def roll_up(self, probabilities: torch.Tensor, task: str) -> torch.Tensor:
        """(..., num_classes) class probabilities -> (..., num_tags) tag probabilities: sums
        for a single-label model, maxima for a multi-label one (see the module's docstring)."""
        if task == "single_label":
            return (probabilities.double() @ self.membership.double()).clamp_(0, 1).float()
        masked = probabilities.unsqueeze(-1) * self.membership  # (..., C, T)
        return masked.amax(dim=-2)

    def select(
        self,
        tag_probabilities: torch.Tensor,
        top_k: int,
        threshold: float | None = None,
        whole: bool = False,
    ) -> list[Scored]:
        """One photo's (num_tags,) probabilities -> its most specific confident tags, most
        probable first, at most ``top_k``. ``whole``: the probabilities are the whole photo's
        alone, not merged with regions (:meth:`thresholds`). ``threshold`` replaces every
        tag's own."""
        limits = self.thresholds(whole)
        if threshold is not None:
            limits = torch.full_like(limits, threshold)
        confident = (tag_probabilities >= limits).tolist()
        covered = [False] * len(self.tags)
        for t, sure in enumerate(confident):
            if sure:
                for parent in self._ancestors[t]:
                    covered[parent] = True
        chosen = [t for t, sure in enumerate(confident) if sure and not covered[t]]
        chosen.sort(key=lambda t: (-float(tag_probabilities[t]), t))
        return [
            Scored(self.tags[t].label, float(tag_probabilities[t]), self.tags[t].path)
            for t in chosen[:top_k]
        ]


def shipped(name: str = "imagenet") -> dict[str, Any]:
    """A vocabulary shipped with phototag (``model/vocabularies/NAME.json``), as card JSON."""
    text = resources.files("model").joinpath("vocabularies", f"{name}.json").read_text()
    data = json.loads(text)
    return {key: data[key] for key in ("name", "tags", "hidden")}


def tag_report(
    vocabulary: Vocabulary,
    probabilities: torch.Tensor,
    truths: Sequence[set[int]],
    task: str,
    top_k: int = 5,
) -> dict[str, Any]:
    """How the tags a photo gets fare against its true classes. ``probabilities`` (N, C); per
    photo, ``truths`` holds the indices of its true classes. A returned tag is right when one of
    the classes it gathers is true (so "animal" is right for a cat, "dog" is not).

    precision: right tags / returned tags; coverage: photos with at least one tag; right_first:
    photos whose first tag is right, of those with a tag; per tag: returned and right counts."""
    rolled = vocabulary.roll_up(probabilities, task)  # (N, T)
    gathered = [set(members) for members in vocabulary.gathered]
    index = {tag.label: t for t, tag in enumerate(vocabulary.tags)}
    verdicts, per_tag = [], {}
    for photo, truth in zip(rolled, truths, strict=True):
        chosen = vocabulary.select(photo, top_k, whole=True)  # the photo read whole
        verdicts.append([bool(gathered[index[s.label]] & truth) for s in chosen])
        for scored, verdict in zip(chosen, verdicts[-1], strict=True):
            counts = per_tag.setdefault(scored.label, [0, 0])
            counts[0] += 1
            counts[1] += verdict
    return summarise(verdicts) | {
        "per_tag": {
            label: {"returned": n, "right": r} for label, (n, r) in sorted(per_tag.items())
        },
    }


def summarise(verdicts: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Per photo, whether each tag it got (in order) is right -> photos, precision, coverage,
    tags per photo and right_first (see :func:`tag_report`)."""
    photos = len(verdicts)
    returned = sum(map(len, verdicts))
    tagged = sum(1 for v in verdicts if v)
    return {
        "photos": photos,
        "precision": sum(map(sum, verdicts)) / returned if returned else None,
        "coverage": tagged / photos if photos else None,
        "tags_per_photo": returned / photos if photos else None,
        "right_first": sum(1 for v in verdicts if v and v[0]) / tagged if tagged else None,
    }


def fit_threshold(
    probabilities: torch.Tensor,
    right: torch.Tensor,
    precision: float,
    minimum: int,
    weights: torch.Tensor | None = None,
) -> float | None:
    """The lowest threshold at which a tag returned whenever its probability reaches it is
    right at least ``precision`` of the time, over at least ``minimum`` returned examples;
    None when the examples cannot show it. ``probabilities`` (N,), ``right`` (N,) bool;
    ``weights`` (N,): how much each photo counts towards the precision (default: equally)."""
    order = probabilities.argsort(descending=True)
    weights = torch.ones(len(order)) if weights is None else weights
    weights = weights.double()[order]
    hits = (right[order].double() * weights).cumsum(0)
    counts = torch.arange(1, len(order) + 1, dtype=torch.float64)
    # hits >= precision * returned, with room for rounding: 9 of 10 equal weights meet 0.9
    good = (hits >= precision * weights.cumsum(0) - 1e-9) & (counts >= minimum)
    # the lowest threshold whose whole returned set (everything at or above it) is precise
    # enough: the deepest prefix of the sorted probabilities that still meets the target
    if not bool(good.any()):
        return None
    deepest = int(good.nonzero().max())
    return float(probabilities[order[deepest]])


def fit_thresholds(
    vocabulary: Vocabulary,
    probabilities: torch.Tensor,
    truths: Sequence[set[int]],
    task: str,
    precision: float = 0.95,
    minimum: int = 10,
    floor: float = 0.0,
    weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Thresholds from labelled photos, to a precision target (see :func:`fit_threshold`;
    ``weights`` (N,): how much each photo counts). ``probabilities`` (N, C) are rolled up here;
    a tag is right on a photo where it gathers one of its true classes (``truths``). See
    :func:`fit_rolled_thresholds` for the rest."""
    rolled = vocabulary.roll_up(probabilities, task)  # (N, T)
    right = torch.tensor(
        [[bool(set(members) & truth) for members in vocabulary.gathered] for truth in truths]
    )  # (N, T)
    return fit_rolled_thresholds(vocabulary, rolled, right, precision, minimum, floor, weights)


def fit_rolled_thresholds(
    vocabulary: Vocabulary,
    rolled: torch.Tensor,
    right: torch.Tensor,
    precision: float = 0.95,
    minimum: int = 10,
    floor: float = 0.0,
    weights: torch.Tensor | None = None,
    category_precision: float | None = None,
) -> dict[str, Any]:
    """Thresholds from the tag probabilities photos are served with (``rolled``, (N, T)) and
    whether each tag is right on each photo (``right``, (N, T) bool).

    A tag with at least ``minimum`` right examples gets its own; every other tag the one fitted
    on all tags of its depth together (categories, then the tags below them), so a tag the
    photos never show still answers to the same standard. Categories answer to
    ``category_precision`` (default: ``precision``): a category alone is vague, so it should be
    surer than a specific tag. None is below ``floor``: a few labelled sets show a tag far fewer
    kinds of wrong photos than a library does (an "insect" at 0.05 is right on a set of ants and
    bees, and junk on a holiday photo). Returns ``{"tags": {label: t}, "depth": {depth: t}}``, to
    write into a vocabulary with :func:`apply_thresholds`."""
    targets = {1: category_precision or precision, 2: precision}
    depths = torch.tensor([min(len(tag.path), 2) for tag in vocabulary.tags])
    own: dict[str, float] = {}
    for t, tag in enumerate(vocabulary.tags):
        if int(right[:, t].sum()) >= minimum:
            target = targets[int(depths[t])]
            fitted = fit_threshold(rolled[:, t], right[:, t], target, minimum, weights)
            if fitted is not None:
                own[tag.label] = round(max(fitted, floor), 4)
    depth: dict[str, float] = {}
    for level in (1, 2):
        columns = depths == level
        per_tag = None if weights is None else weights.repeat_interleave(int(columns.sum()))
        fitted = fit_threshold(
            rolled[:, columns].reshape(-1),
            right[:, columns].reshape(-1),
            targets[level],
            minimum,
            per_tag,
        )
        if fitted is not None:
            depth[str(level)] = round(max(fitted, floor), 4)
    return {"tags": own, "depth": depth}


def apply_thresholds(data: dict[str, Any], fitted: dict[str, Any], default: float) -> None:
    """Write ``fitted`` thresholds (from :func:`fit_thresholds`) into vocabulary JSON ``data``:
    a tag's own, else its depth's, else ``default``; and where ``fitted`` has ``whole`` (the
    same, fitted for the whole photo alone), each tag's ``whole_threshold`` likewise."""
    for tag in data["tags"]:
        tag["threshold"] = _fitted(fitted, tag, default)
        tag.pop("whole_threshold", None)  # a value of an earlier fit would not fit this one
        if "whole" in fitted:
            tag["whole_threshold"] = _fitted(fitted["whole"], tag, default)


def _fitted(fitted: dict[str, Any], tag: dict[str, Any], default: float) -> float:
    """A tag's threshold in a fit: its own, else its depth's, else ``default``."""
    level = str(min(len(tag["path"]), 2))
    return fitted["tags"].get(tag["label"], fitted["depth"].get(level, default))
