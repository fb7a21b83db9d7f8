"""The batch tagging class: one checkpoint, loaded once per process (or Ray worker), turning
photo files into result rows with exactly the server's pipeline.

:meth:`BatchTagger.prepare` reads one file, recognises a photo by its bytes, hashes it and runs
:meth:`model.tagger.Tagger.prepare` (decode, draft, pixel limit, people tags): thread-safe, so
the local engine runs it on its decode pool. :meth:`BatchTagger.tag` runs one forward pass for a
batch (:meth:`Tagger.probabilities`) and each photo's :meth:`Tagger.tags`, as the server's
batcher and routes do: the same probabilities, tags, vocabulary, people tags (and whatever else
``Tagger.tags`` learns, custom tags included). ``__call__`` is the same for a Ray Data batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from model import regions
from model.imageio import PhotoError, sniff_format
from model.library.walk import Candidate
from model.tagger import DEFAULT_MAX_PIXELS, DEFAULT_REDUCING_GAP, Prepared, Scores, Tag

log = logging.getLogger("phototag.library")

HEAD_BYTES = 4096  # enough for every signature sniff_format reads (HEIF brands included)

# Tag path roots that do not come from the classifier, so have no heatmap.
EXTERNAL = ("people", "custom")

# Row statuses. "not_a_photo" rows are counted, never recorded.
TAGGED, FAILED, REMOVED, NOT_A_PHOTO = "tagged", "error", "removed", "not_a_photo"


@dataclass(frozen=True)
class TaggingOptions:
    """What a run tags with; plain values, so Ray can ship it to its workers."""

    checkpoint: str
    top_k: int = 5
    threshold: float | None = None
    people: bool = True  # PHOTOTAG_PEOPLE's default: the server's pipeline
    regions: int = regions.DEFAULT  # PHOTOTAG_REGIONS's default
    custom_tags: str | None = None  # the custom-tag store to tag with (phototag teach's)
    names: str | None = None  # the names folder to name faces with (needs people); None: off
    explain: str | None = None  # a folder for each photo's top-tag heatmap, for a review
    max_pixels: int = DEFAULT_MAX_PIXELS
    reducing_gap: float = DEFAULT_REDUCING_GAP
    device: str = "auto"
    backend: str = "auto"
    autocast: str = "auto"
    torch_threads: int = 0
    decode_threads: int = 0  # for __call__ (Ray); the local engine has its own pool

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: use 1 or more")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold}: use a probability, 0 to 1")
        if 0 < self.reducing_gap < 1:
            raise ValueError(f"reducing_gap={self.reducing_gap}: use 0 or at least 1")


@dataclass
class Item:
    """One file on its way through: read and decoded, or why not."""

    candidate: Candidate
    sha256: str | None = None
    prepared: Prepared | None = None
    error: dict | None = None  # {"code", "message"}
    photo: bool = True  # False: its bytes are no photo format; skipped quietly


def read_photo(candidate: Candidate) -> tuple[Item, bytes | None]:
    """The file's bytes when they start like a photo (by :func:`sniff_format`), else an item
    that says why not; only the head of a non-photo is read."""
    item = Item(candidate)
    try:
        with open(candidate.path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if sniff_format(head) is None:
                item.photo = False
                return item, None
            data = head + f.read()
    except OSError as exc:
        item.error = {"code": "unreadable", "message": f"cannot read: {exc.strerror or exc}"}
        return item, None
    item.sha256 = hashlib.sha256(data).hexdigest()
    return item, data


def model_ref(checkpoint: str | Path, name: str, version: str) -> dict:
    """As the server's responses name a model: id (the file name's stem), name, version."""
    return {"id": Path(checkpoint).stem, "name": name, "version": version}


def tag_dicts(tags: Sequence[Tag]) -> list[dict]:
    return [
        {"label": t.label, "probability": t.probability, "path": list(t.path or (t.label,))}
        for t in tags
    ]


def make_row(item: Item, model: dict | None, tags: list[dict] | None, status: str) -> dict:
    """One photo's result row (the ``--out`` file's schema; see results.py)."""
    c = item.candidate
    mtime = datetime.fromtimestamp(c.mtime_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
    return {
        "path": c.path,
        "size": c.size,
        "mtime": mtime,
        "mtime_ns": c.mtime_ns,
        "sha256": item.sha256,
        "status": status,
        "model": model,
        "tags": tags or [],
        "error": item.error,
        "xmp": None,
    }


def face_fields(prepared: Prepared) -> dict:
    """A row's faces, with names on: each face's box (x0, y0, x1, y1 in the photo's pixels),
    score, name (or null) and the name's probability; and the photo's ``dimensions`` (width,
    height) the boxes are in. Never a face descriptor."""
    faces = [
        {"box": list(f.box), "score": f.score, "name": f.name, "probability": f.probability}
        for f in prepared.faces or ()
    ]
    return {"faces": faces, "dimensions": list(prepared.size or ())}


class BatchTagger:
    """A checkpoint on this machine's runtime, with the face detector when people tags are on."""

    def __init__(self, options: TaggingOptions | dict) -> None:
        from model.people import FaceDetector
        from model.runtime import RuntimeChoice
        from model.tagger import Tagger

        if isinstance(options, dict):
            options = TaggingOptions(**options)
        self.options = options
        choice = RuntimeChoice.resolve(
            options.device, options.backend, options.autocast, options.torch_threads
        )
        people = FaceDetector.load(choice) if options.people else None
        names = None
        if options.names and people is not None:
            from model.people.names import Embedder, Namer, NameStore

            names = Namer(Embedder.load(choice), NameStore(options.names))
        self.tagger = Tagger.load(options.checkpoint, choice, people, options.regions, names)
        self.model = model_ref(options.checkpoint, self.tagger.card_name, self.tagger.version)
        if options.custom_tags:
            from model.custom_tags import CustomTagStore
            from model.teach import serve_tags

            serve_tags(CustomTagStore(options.custom_tags), self.model["id"], self.tagger)
        self._pool: ThreadPoolExecutor | None = None

    def prepare(self, candidate: Candidate) -> Item:
        """Read, recognise, hash and decode one file (any thread)."""
        item, data = read_photo(candidate)
        if data is None:
            return item
        try:
            item.prepared = self.tagger.prepare(
                data, max_pixels=self.options.max_pixels, reducing_gap=self.options.reducing_gap
            )
        except PhotoError as exc:
            item.error = {"code": exc.code, "message": exc.message}
        except Exception as exc:  # a decoder bug on one odd photo must not stop the run
            log.exception("unexpected error decoding %s", candidate.path)
            item.error = {"code": "invalid_image", "message": f"could not be decoded: {exc}"}
        return item

    def tag(self, items: Sequence[Item]) -> list[dict]:
        """Rows for a batch of prepared items: one forward pass for the photos among them."""
        good = [i for i in items if i.prepared is not None]
        probabilities = self._forward([i.prepared.pixels for i in good]) if good else []
        tagged = {id(item): p for item, p in zip(good, probabilities, strict=True)}
        rows = []
        for item in items:
            if not item.photo:
                rows.append(make_row(item, None, None, NOT_A_PHOTO))
                continue
            p = tagged.get(id(item))
            if isinstance(p, Scores):
                tags = self.tagger.tags(
                    p, self.options.top_k, self.options.threshold, "tags", item.prepared.people
                )
                rows.append(make_row(item, self.model, tag_dicts(tags), TAGGED))
                if item.prepared.faces is not None:  # names on
                    rows[-1] |= face_fields(item.prepared)
                if self.options.explain:
                    self._explain(item, tags)
            else:
                item.error = item.error or p
                rows.append(make_row(item, self.model, None, FAILED))
        return rows

    def _explain(self, item: Item, tags: Sequence[Tag]) -> None:
        """The heatmap of the photo's first tag the classifier gave (people and custom tags come
        from elsewhere) drawn on it: ``<sha256 prefix>-<name>.<tag>.png`` in the review folder."""
        label = next((t.label for t in tags if t.path and t.path[0] not in EXTERNAL), None)
        if label is None:
            return
        path = Path(item.candidate.path)
        name = f"{item.sha256[:8]}-{path.name}.{label}.png".replace("/", "_")
        try:
            self.tagger.write_overlay(path.read_bytes(), Path(self.options.explain) / name, label)
        except Exception as exc:  # a review picture that fails must not fail the photo's row
            log.warning("%s: no heatmap for %s: %s", path, label, exc)

    def _forward(self, pixels: list[torch.Tensor]) -> list[Scores | dict]:
        """Each photo's scores (class probabilities, custom tags); a batch that fails is retried
        photo by photo, so only a photo that fails alone fails."""
        try:
            return list(self.tagger.outputs(torch.stack(pixels)).unbind(0))
        except Exception as exc:
            if len(pixels) == 1:
                log.error("inference failed on one photo: %s", exc)
                return [{"code": "inference_failed", "message": f"{type(exc).__name__}: {exc}"}]
            return [r for p in pixels for r in self._forward([p])]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A Ray Data batch (columns ``path``, ``size``, ``mtime_ns``) -> column ``row``: each
        photo's result row as JSON, decoded on this worker's threads, one forward pass."""
        if self._pool is None:
            threads = self.options.decode_threads or min(8, os.cpu_count() or 1)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="phototag-decode")
        candidates = [
            Candidate(str(p), int(s), int(m))
            for p, s, m in zip(batch["path"], batch["size"], batch["mtime_ns"], strict=True)
        ]
        rows = self.tag(list(self._pool.map(self.prepare, candidates)))
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


class Remover:
    """``--mode remove``: the tagging class's shape, tagging nothing. Each photo (recognised by
    its bytes; nothing is decoded) becomes a ``removed`` row, whose machine tags the caller then
    takes out of its XMP."""

    def prepare(self, candidate: Candidate) -> Item:
        item = Item(candidate)
        try:
            with open(candidate.path, "rb") as f:
                item.photo = sniff_format(f.read(HEAD_BYTES)) is not None
        except OSError as exc:
            item.error = {"code": "unreadable", "message": f"cannot read: {exc.strerror or exc}"}
        return item

    def tag(self, items: Sequence[Item]) -> list[dict]:
        rows = []
        for item in items:
            status = FAILED if item.error else REMOVED if item.photo else NOT_A_PHOTO
            rows.append(make_row(item, None, None, status))
        return rows
