"""Tags in the user's language: the label of a tag path in each language.

A tag's ``path`` (``("animal", "cat")``) is its stable id, in English whatever the language;
this module gives its ``label`` and the labels of its whole path in another language
(``Katze``, ``["Tier", "Katze"]``). English (``en``) is the vocabulary's own labels: a path's
last element, exactly as every response has it without a language.

The languages come from label files, one per language::

    {"language": "de", "name": "Deutsch", "notice": "...",
     "labels": {"animal": "Tier", "animal/cat": "Katze", ...}}

phototag ships ``model/vocabularies/imagenet.<lang>.json`` (every tag of the ImageNet vocabulary
and the people tags). An operator's folder (``PHOTOTAG_LABELS_DIR``) may hold more files of the
same format: one for a shipped language holds only the labels it changes or adds (the shipped
ones stay for the rest), one for a new language adds that language (then ``name`` is required).
Every file is checked when it is loaded; a bad one is one :class:`LabelsError` naming the file
and the problem.

A path a language has no label for (a tag added to the vocabulary later, a trained checkpoint's
own tags, a raw class) keeps its English label, element by element. A custom tag (``custom/NAME``)
keeps the name it was taught with.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

ENGLISH = "en"
ENGLISH_NAME = "English"
SEPARATOR = "/"  # between the elements of a path in a label file's keys
CUSTOM = "custom"  # a custom tag's path: ("custom", NAME); NAME is its own label
SHIPPED_VOCABULARY = "imagenet"  # model/vocabularies/imagenet.<lang>.json
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")  # an ISO 639 language code, as Accept-Language's
_FIELDS = ("language", "name", "notice", "labels")


class LabelsError(ValueError):
    """A label file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LabelFile:
    """One language's labels: ``labels`` maps a path joined with ``/`` to its label."""

    language: str
    name: str
    labels: Mapping[str, str]
    notice: str = ""

    @classmethod
    def from_dict(cls, data: object, where: str, *, name_required: bool = True) -> LabelFile:
        """A label file's JSON -> a checked :class:`LabelFile`; :class:`LabelsError` (naming
        ``where``) when it is not one. ``name_required``: False for a file that only changes a
        known language's labels."""

        def bad(problem: str) -> LabelsError:
            return LabelsError(f"{where}: {problem}")

        if not isinstance(data, dict):
            raise bad("a label file is a JSON object with language, name and labels")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise bad(f"unknown field {unknown[0]!r} (a label file has {', '.join(_FIELDS)})")
        language = data.get("language")
        if not isinstance(language, str) or not _LANGUAGE.match(language):
            raise bad(
                f"language {language!r} is not a language code (two or three lower-case "
                "letters: de, fr, pt)"
            )
        if language == ENGLISH:
            raise bad(
                "language 'en' is the vocabulary's own labels (the tags' paths) and cannot be "
                "changed by a label file"
            )
        name = data.get("name", "")
        if not isinstance(name, str) or (name_required and not name.strip()):
            raise bad("name must be the language's name in itself (Deutsch, Français, 日本語)")
        notice = data.get("notice", "")
        if not isinstance(notice, str):
            raise bad("notice must be a string")
        labels = data.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise bad('labels must be an object of tag paths to labels: {"animal/cat": "..."}')
        for key, label in labels.items():
            _check_entry(key, label, bad)
        return cls(language, name.strip(), dict(labels), notice)

    def to_dict(self) -> dict[str, Any]:
        return {
            "language": self.language,
            "name": self.name,
            "notice": self.notice,
            "labels": dict(self.labels),
        }


def _check_entry(key: object, label: object, bad: Any) -> None:
    if not isinstance(key, str) or not key or any(not p.strip() for p in key.split(SEPARATOR)):
        raise bad(f"{key!r} is not a tag path (its elements joined with '/': animal/cat)")
    if key.split(SEPARATOR)[0] == CUSTOM and SEPARATOR in key:
        raise bad(f"{key!r}: a custom tag keeps the name it was taught with; no label for it")
    if not isinstance(label, str) or not label.strip():
        raise bad(f"{key!r}: its label must be a non-empty string, not {label!r}")
    if label != label.strip() or any(ord(c) < 32 for c in label):
        raise bad(f"{key!r}: its label {label!r} has spaces around it or control characters")


def dump(file: LabelFile) -> str:
    """A label file's text, as phototag writes and ships them (``read`` gives it back)."""
    return json.dumps(file.to_dict(), indent=2, ensure_ascii=False) + "\n"


def parse(text: str, where: str, *, name_required: bool = True) -> LabelFile:
    """A label file's text -> a checked :class:`LabelFile` (:class:`LabelsError` otherwise)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise LabelsError(f"{where}: {twice!r} is given twice")
        return dict(pairs)

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise LabelsError(
            f"{where}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return LabelFile.from_dict(data, where, name_required=name_required)


def read(path: str | Path, *, name_required: bool = True) -> LabelFile:
    """A label file from disk, checked (:class:`LabelsError` naming it otherwise)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LabelsError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return parse(text, str(path), name_required=name_required)


def write(file: LabelFile, path: str | Path) -> Path:
    """Write a label file atomically (temp file in the same folder, then a rename)."""
    from model.checkpoint import atomic_write_bytes

    return atomic_write_bytes(path, dump(file).encode("utf-8"))


@cache
def shipped() -> tuple[LabelFile, ...]:
    """The label files phototag ships (``model/vocabularies/imagenet.<lang>.json``), by code."""
    folder = resources.files("model").joinpath("vocabularies")
    files = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        stem, _, suffix = entry.name.partition(".")
        if stem == SHIPPED_VOCABULARY and suffix.count(".") == 1 and suffix.endswith(".json"):
            where = f"model/vocabularies/{entry.name}"
            files.append(parse(entry.read_text(encoding="utf-8"), where))
    return tuple(files)


def shipped_languages() -> tuple[str, ...]:
    """English and the languages phototag ships labels for, English first."""
    return (ENGLISH, *(f.language for f in shipped()))


@dataclass(frozen=True)
class Labels:
    """Every language's labels: ``label(path, lang)``, ``path_labels(path, lang)``.

    ``files`` holds one merged :class:`LabelFile` per language other than English."""

    files: Mapping[str, LabelFile] = field(default_factory=dict)

    @classmethod
    def load(cls, labels_dir: str | Path | None = None) -> Labels:
        """The shipped languages, with an operator's label files (``labels_dir``, the
        ``*.json`` files in it) over them. Raises :class:`LabelsError`, naming the file, for a
        bad one: unreadable, malformed, two files of one language, or two sibling tags with one
        label once merged."""
        files = {f.language: f for f in shipped()}
        if labels_dir is not None:
            files = _with_operators(files, Path(labels_dir))
        return cls(files)

    @property
    def languages(self) -> tuple[str, ...]:
        """The language codes served: English first, then the others in alphabetical order."""
        return (ENGLISH, *sorted(self.files))

    def name(self, language: str) -> str:
        """A language's name in itself (``Deutsch``); English's is ``English``."""
        return ENGLISH_NAME if language == ENGLISH else self.files[language].name

    def __contains__(self, language: object) -> bool:
        return language == ENGLISH or language in self.files

    def label(self, path: Sequence[str], language: str) -> str:
        """The label of the tag at ``path`` in ``language``: its file's label, else the English
        one (the path's last element). A custom tag's is its name in every language."""
        if language == ENGLISH or (len(path) > 1 and path[0] == CUSTOM):
            return path[-1]
        return self.files[language].labels.get(SEPARATOR.join(path), path[-1])

    def path_labels(self, path: Sequence[str], language: str) -> list[str]:
        """The labels of ``path``'s elements in ``language``: its parents' and its own
        (``["Tier", "Katze"]`` for ``animal/cat`` in German)."""
        return [self.label(path[: i + 1], language) for i in range(len(path))]

    def digest(self, language: str) -> str:
        """What a language's labels are: a change of any makes another digest (``phototag tag``
        keys the keywords it wrote on it)."""
        table = {} if language == ENGLISH else dict(sorted(self.files[language].labels.items()))
        text = json.dumps([language, table], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _with_operators(files: dict[str, LabelFile], folder: Path) -> dict[str, LabelFile]:
    if not folder.is_dir():
        raise LabelsError(f"{folder}: not a folder of label files (PHOTOTAG_LABELS_DIR)")
    seen: dict[str, Path] = {}
    merged = dict(files)
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):  # a temp file of an atomic write, an editor's backup
            continue
        own = read(path, name_required=False)  # a name is needed for a new language only
        if own.language in seen:
            raise LabelsError(
                f"{path}: language {own.language!r} already comes from {seen[own.language]}; "
                "put one language's labels in one file"
            )
        seen[own.language] = path
        base = merged.get(own.language)
        if base is None and not own.name:
            raise LabelsError(
                f"{path}: {own.language!r} is a new language: give its name "
                "(the language's name in itself, as the page lists it)"
            )
        labels = {**(base.labels if base else {}), **own.labels}
        merged[own.language] = LabelFile(
            own.language,
            own.name or (base.name if base else own.language),
            labels,
            own.notice or (base.notice if base else ""),
        )
        twins = sibling_twins(labels)
        if twins:
            parent, label, keys = twins[0]
            raise LabelsError(
                f"{path}: two tags under {parent or 'the top'} would both read {label!r} in "
                f"{own.language}: {', '.join(keys)}"
            )
    return merged


def sibling_twins(labels: Mapping[str, str]) -> list[tuple[str, str, list[str]]]:
    """Labels that two sibling tags (one parent) share: ``(parent, label, [their paths])``; a
    person could not tell them apart in a keyword list."""
    by_parent: dict[tuple[str, str], list[str]] = {}
    for key, label in labels.items():
        parent = key.rpartition(SEPARATOR)[0]
        by_parent.setdefault((parent, label.casefold()), []).append(key)
    return [
        (parent, labels[keys[0]], sorted(keys))
        for (parent, _), keys in sorted(by_parent.items())
        if len(keys) > 1
    ]
