"""Names for faces: the people a person taught (a :class:`NameStore`, one file per name holding
that person's face descriptors), who a detected face is (:func:`identify`), and the descriptor
network on the process's runtime (:class:`Embedder`, batched over a photo's faces).

Privacy: naming is off unless the operator turns it on (``PHOTOTAG_NAMES=on``). Descriptors are
kept only in the store's folder (mode 0700), never sent anywhere and never in an API response;
removing a name deletes its file, and with it every descriptor it held.

Usage::

    store = NameStore(default_names_dir(models_folder))
    store.add("alice", embedder.embed(image, [face]))
    namer = Namer(embedder, store)
    names = namer.name(image, faces)  # one Identity or None per face
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from model.checkpoint import atomic_write_bytes
from model.errors import CodedError
from model.explain import scale_boxes
from model.people.detector import Face, FaceDetector
from model.people.embedding import DESCRIPTOR_DIM, FaceEmbedder, align_faces, load_embedder
from model.people.tags import PEOPLE_TAGS
from model.runtime import Backend, RuntimeChoice

STORE_FOLDER = "names"
SUFFIX = ".safetensors"
FORMAT_VERSION = 1
METADATA_KEY = "phototag_name"
# A name is its file name and a URL path segment: letters, digits, "-" and "_", starting with a
# letter or digit, at most 48 characters; case is kept (people|Alice in a sidecar).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$"
_NAME = re.compile(NAME_PATTERN)
MAX_EXAMPLES = 100  # per name: more adds nothing to a nearest-example match

# The open-set line: a face is a taught person only when its descriptor lies closer than this
# to one of that person's examples. dlib's same-person line is 0.6 (LFW pairs); on photos a
# stranger's nearest example sits closer than on LFW's pairs, so the line is drawn below it
# (bench/names_bench.py measures it; bench/README.md has the figures).
MATCH_DISTANCE = 0.55
# probability = sigmoid((PROBABILITY_MIDPOINT - distance) / PROBABILITY_SCALE): 0.5 at dlib's
# same-person line, 0.73 at 0.55, 0.88 at 0.5, 0.98 at 0.4 (the same photo flipped or rescaled
# lies about 0.2 from itself)
PROBABILITY_MIDPOINT = 0.6
PROBABILITY_SCALE = 0.05
# A face smaller than this (its side, in the decoded photo's pixels) gets no name: the
# descriptors of tiny, blurred faces crowd together (bench/names_bench.py: strangers' faces in
# coco-dev lie under the line twice as often when faces of 10-30 px are kept)
MIN_NAMED_SIDE = 32.0
# Nor does a face the detector is less sure of than this: faces it scores lower (blurred,
# turned, half hidden) count as people but their descriptors crowd together too
# (bench/names_bench.py measures the line on faces at least this sure)
MIN_NAMED_SCORE = 0.7


def nameable(face: Face) -> bool:
    """Whether a face is clear enough to name (:data:`MIN_NAMED_SIDE`, :data:`MIN_NAMED_SCORE`)."""
    return face.side >= MIN_NAMED_SIDE and face.score >= MIN_NAMED_SCORE


class NamesError(CodedError, ValueError):
    """A name cannot be taught, read or found; ``code`` is stable, the message is for a person."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise NamesError(
            "invalid_name",
            f"{name!r} is not a name: use 1 to 48 letters, digits, '-' or '_', starting with a "
            "letter or digit (e.g. Alice, jean-luc)",
        )
    if name.lower() in PEOPLE_TAGS:
        raise NamesError(
            "invalid_name", f"{name!r} is a people tag ({', '.join(PEOPLE_TAGS)}): pick another"
        )
    return name


def default_names_dir(models_folder: Path) -> Path:
    """Where the names are kept by default: ``names/`` in the models folder."""
    return Path(models_folder) / STORE_FOLDER


def probability(distance: float) -> float:
    """A descriptor distance -> how sure the name is (see :data:`PROBABILITY_MIDPOINT`)."""
    return 1.0 / (1.0 + math.exp((distance - PROBABILITY_MIDPOINT) / PROBABILITY_SCALE))


# ---- the store


@dataclass(frozen=True)
class Gallery:
    """Every taught example at once: (M, 128) descriptors, each owned by one of ``names``."""

    names: tuple[str, ...]
    embeddings: torch.Tensor  # (M, 128) float32
    owners: torch.Tensor  # (M,) int64, an index into names

    @classmethod
    def empty(cls) -> Gallery:
        return cls((), torch.zeros(0, DESCRIPTOR_DIM), torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.names)


class NameStore:
    """The taught names, one file each: ``root/<name>.safetensors`` with that person's example
    descriptors (N, 128). Writes are atomic (temp file and rename) and serialised by a lock, so
    concurrent teaching in one process loses no example; the folder is the only state, so the
    store survives restarts."""

    def __init__(self, root: str | Path, max_examples: int = MAX_EXAMPLES) -> None:
        self.root = Path(root)
        self.max_examples = max_examples
        self._lock = threading.Lock()
        # the gallery as read, and the folder's files then (name, inode, mtime, size): read
        # again when they change, so names another process (phototag people) teaches are seen
        self._gallery: tuple[tuple, Gallery] | None = None

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        return [name for name, *_ in self._files()]

    def counts(self) -> dict[str, int]:
        """Each name's number of examples."""
        return {name: len(self.load(name)) for name in self.names()}

    def load(self, name: str) -> torch.Tensor:
        """A name's example descriptors (N, 128). Raises NamesError ``unknown_name``."""
        path = self.path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NamesError("unknown_name", f"nobody is named {name!r}") from None
        try:
            embeddings = load_safetensors_bytes(data)["embeddings"].float()
            if embeddings.dim() != 2 or embeddings.shape[1] != DESCRIPTOR_DIM:
                raise ValueError(f"shape {tuple(embeddings.shape)}")
        except Exception as exc:  # a damaged or foreign file
            raise NamesError("invalid_name_file", f"{path}: not a name file ({exc})") from None
        return embeddings

    def add(self, name: str, embeddings: torch.Tensor) -> int:
        """Add example descriptors (N, 128) to ``name``, creating it; return its example count.
        Raises NamesError (``invalid_name``, ``limit_reached``) and leaves the file as it was."""
        check_name(name)
        if embeddings.dim() != 2 or embeddings.shape[1] != DESCRIPTOR_DIM or not len(embeddings):
            raise ValueError(f"expected (N, {DESCRIPTOR_DIM}) descriptors, got {embeddings.shape}")
        with self._lock:
            old = self.load(name) if self.path(name).is_file() else embeddings[:0]
            total = torch.cat([old, embeddings.detach().float().cpu()])
            if len(total) > self.max_examples:
                raise NamesError(
                    "limit_reached",
                    f"{name!r} would have {len(total)} example faces; at most {self.max_examples}",
                )
            self._write(name, total)
            self._gallery = None
        return len(total)

    def _write(self, name: str, embeddings: torch.Tensor) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "name": name}
        data = save_safetensors_bytes(
            {"embeddings": embeddings.contiguous()}, metadata={METADATA_KEY: json.dumps(meta)}
        )
        atomic_write_bytes(self.path(name), data)

    def remove(self, name: str) -> None:
        """Forget ``name``: its file, with every descriptor in it, is deleted. Raises NamesError
        ``unknown_name``."""
        with self._lock:
            try:
                self.path(name).unlink()
            except FileNotFoundError:
                raise NamesError("unknown_name", f"nobody is named {name!r}") from None
            self._gallery = None

    def gallery(self) -> Gallery:
        """Every name's examples as one :class:`Gallery`, read again whenever the folder's name
        files changed (a write through this store, or another process's: the CLI teaching a
        running server's store)."""
        state = self._files()
        cached = self._gallery
        if cached is not None and cached[0] == state:
            return cached[1]
        with self._lock:
            state = self._files()
            gallery = self._read_gallery()
            self._gallery = (state, gallery)
        return gallery

    def _files(self) -> tuple:
        """The folder's name files, sorted by name, as (name, inode, mtime, size): a few stats,
        cheap beside a face. Every write is a rename of a new file, so the inode changes with
        each. No folder (or a file in its place): no names."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return ()
        found = []
        for entry in entries:
            stem = entry.name.removesuffix(SUFFIX)
            if not entry.name.endswith(SUFFIX) or not _NAME.match(stem):
                continue
            try:
                if entry.is_file():
                    stat = entry.stat()
                    found.append((stem, stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:  # removed meanwhile
                continue
        return tuple(sorted(found))

    def _read_gallery(self) -> Gallery:
        names, tensors, owners = [], [], []
        for name in self.names():
            try:
                embeddings = self.load(name)
            except NamesError:
                continue  # removed meanwhile, or unreadable
            owners.append(torch.full((len(embeddings),), len(names), dtype=torch.long))
            names.append(name)
            tensors.append(embeddings)
        if not names:
            return Gallery.empty()
        return Gallery(tuple(names), torch.cat(tensors), torch.cat(owners))


# ---- who is this face


@dataclass(frozen=True)
class Identity:
    name: str
    probability: float  # :func:`probability` of the distance
    distance: float  # to the name's nearest example


def identify(
    embeddings: torch.Tensor, gallery: Gallery, threshold: float = MATCH_DISTANCE
) -> list[Identity | None]:
    """The name of each face (its descriptor a row of ``embeddings``, (F, 128)), or None.

    A face's distance to a name is the distance to that name's nearest example; a name is a
    candidate for a face only under ``threshold`` (the open-set line: a stranger gets none).
    Faces of one photo never share a name: (face, name) pairs are taken greedily, closest first,
    each face and each name at most once."""
    faces = len(embeddings)
    if not faces or not len(gallery):
        return [None] * faces
    distances = torch.cdist(embeddings.float(), gallery.embeddings)  # (F, M)
    per_name = torch.full((faces, len(gallery)), math.inf)
    per_name = per_name.scatter_reduce(
        1, gallery.owners.expand(faces, -1), distances, reduce="amin"
    )  # (F, N): each name's nearest example
    result: list[Identity | None] = [None] * faces
    taken: set[int] = set()
    order = per_name.flatten().argsort().tolist()
    for flat in order:
        face, name = divmod(flat, len(gallery))
        distance = float(per_name[face, name])
        if distance >= threshold:
            break
        if result[face] is not None or name in taken:
            continue
        result[face] = Identity(gallery.names[name], probability(distance), distance)
        taken.add(name)
    return result


def group(embeddings: torch.Tensor, threshold: float = MATCH_DISTANCE) -> list[list[int]]:
    """Faces nobody named (descriptors (F, 128)) -> groups likely of one person each, largest
    first: greedy single-linkage, a face joining the group of its nearest earlier face when that
    lies under ``threshold``, and two groups a face links merging."""
    parent = list(range(len(embeddings)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(embeddings) > 1:
        close = torch.cdist(embeddings.float(), embeddings.float()) < threshold  # (F, F)
        for i, j in torch.nonzero(torch.triu(close, diagonal=1)).tolist():
            parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(embeddings)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


# ---- the descriptor network on a runtime


class TorchEmbedder:
    backend: Backend = "torch"

    def __init__(self, net: FaceEmbedder, device: torch.device) -> None:
        self.device = device
        self.net = net.to(device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(self, chips: torch.Tensor) -> torch.Tensor:
        chips = chips.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.net(chips).float().cpu()


class OpenVINOEmbedder:
    """The network compiled by OpenVINO for this CPU, in float32 (descriptor distances are
    compared with a fixed line), with a free batch size; one infer request per calling
    thread."""

    backend: Backend = "openvino"

    def __init__(self, net: FaceEmbedder, choice: RuntimeChoice) -> None:
        import openvino

        self.device = torch.device("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model = openvino.convert_model(
                net.cpu(),
                example_input=torch.zeros(1, 3, 150, 150),
                input=[openvino.PartialShape([-1, 3, 150, 150])],
            )
        self._compiled = openvino.Core().compile_model(
            model,
            "CPU",
            {
                "NUM_STREAMS": choice.openvino_threads,
                "INFERENCE_NUM_THREADS": choice.openvino_threads,
                "INFERENCE_PRECISION_HINT": "f32",
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._local = threading.local()

    def run(self, chips: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({0: chips.contiguous().numpy()})
        return torch.from_numpy(result[0].copy())


class Embedder:
    """Face descriptors for a photo's faces, all in one batch, on the classifier's runtime
    (OpenVINO on a CPU where it converts, torch otherwise). Thread-safe."""

    def __init__(self, network: TorchEmbedder | OpenVINOEmbedder) -> None:
        self.network = network

    @classmethod
    def load(cls, choice: RuntimeChoice | None = None, path: str | Path | None = None) -> Embedder:
        choice = choice or RuntimeChoice.resolve()
        net = load_embedder(path)
        if choice.backend == "openvino":
            try:
                return cls(OpenVINOEmbedder(net, choice))
            except Exception:
                if not choice.fallback:
                    raise
        return cls(TorchEmbedder(net, choice.device))

    @property
    def backend(self) -> Backend:
        return self.network.backend

    def embed(self, image: Image.Image, faces: Sequence[Face]) -> torch.Tensor:
        """(F, 128) descriptors of ``faces`` (detected on ``image``), in their order."""
        if not faces:
            return torch.zeros(0, DESCRIPTOR_DIM)
        return self.network.run(align_faces(image, faces))


@dataclass(frozen=True)
class NamedFace:
    """A detected face and who it is: what a photo's result lists (never its descriptor)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the photo's pixels
    score: float  # the detector's confidence
    name: str | None  # None: nobody taught, or nobody close enough
    probability: float | None  # the name's, None without one


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


MIN_BOX_OVERLAP = 0.3  # a box given with a teaching photo picks a face it overlaps this much


def pick_face(faces: Sequence[Face], box: Sequence[float] | None = None) -> Face:
    """The face a teaching photo shows: its only face, or with ``box`` (x0, y0, x1, y1 in the
    same pixels as the faces) the face that overlaps the box most. Raises NamesError
    ``no_face`` or ``several_faces``."""
    if box is not None:
        best = max(faces, key=lambda f: overlap(f.box, box), default=None)
        if best is None or overlap(best.box, box) < MIN_BOX_OVERLAP:
            found = f"{len(faces)} faces, none of them" if faces else "no face, none"
            raise NamesError(
                "no_face",
                f"no face in the box {', '.join(f'{v:g}' for v in box)}: the detector found "
                f"{found} overlapping it by {MIN_BOX_OVERLAP:.0%}; send the face's box, "
                "x0,y0,x1,y1 in the photo's pixels",
            )
        return best
    if not faces:
        raise NamesError(
            "no_face",
            "the detector found no face on the photo: send a photo where the person's face "
            "shows, front on, at least about 40 pixels wide",
        )
    if len(faces) > 1:
        raise NamesError(
            "several_faces",
            f"the photo shows {len(faces)} faces: send a photo of the person alone, or pick "
            "their face with box=x0,y0,x1,y1 (the photo's pixels)",
        )
    return faces[0]


class Namer:
    """Faces of a photo -> who they are, from a store's taught names."""

    def __init__(
        self, embedder: Embedder, store: NameStore, threshold: float = MATCH_DISTANCE
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.threshold = threshold

    def name(
        self, image: Image.Image, faces: Sequence[Face], size: tuple[int, int] | None = None
    ) -> list[NamedFace]:
        """Each face of ``image`` with its name or None, its box scaled to ``size`` (the photo
        as sent, where ``image`` is a JPEG draft; default: the image's own)."""
        boxes = scale_boxes([f.box for f in faces], image.size, size or image.size)
        found: list[Identity | None] = [None] * len(faces)
        named = [i for i, f in enumerate(faces) if nameable(f)]
        gallery = self.store.gallery() if named else Gallery.empty()
        if len(gallery):  # nobody taught: no descriptor is computed
            embeddings = self.embedder.embed(image, [faces[i] for i in named])
            for i, identity in zip(
                named, identify(embeddings, gallery, self.threshold), strict=True
            ):
                found[i] = identity
        return [
            NamedFace(box, f.score, i.name if i else None, i.probability if i else None)
            for box, f, i in zip(boxes, faces, found, strict=True)
        ]

    def example(
        self, detector: FaceDetector, image: Image.Image, box: Sequence[float] | None = None
    ) -> torch.Tensor:
        """The descriptor (1, 128) of a teaching photo's face (:func:`pick_face` among the faces
        clear enough to name, :func:`nameable`; ``box`` in ``image``'s pixels)."""
        face = pick_face([f for f in detector.detect(image) if nameable(f)], box)
        return self.embedder.embed(image, [face])
