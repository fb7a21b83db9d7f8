"""The checkpoint file: one ``.safetensors`` file with the tensors and a JSON model card.

The card (safetensors metadata key ``phototag``) says everything needed to rebuild and serve the
network: architecture and its arguments, task, class names, preprocessing, temperature, per-class
thresholds, metrics, data fingerprint. Loading never unpickles anything, and every problem surfaces
as one :class:`CheckpointError` whose message says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from model import architectures
from model.preprocess import Preprocess
from model.tta import NAMES as TTA_NAMES
from model.vocabulary import Vocabulary, VocabularyError

FORMAT_VERSION = 1
METADATA_KEY = "phototag"
TASKS = ("single_label", "multi_label")
Task = Literal["single_label", "multi_label"]
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says why, for a person."""


@dataclass
class ModelCard:
    """What a checkpoint says about its network, besides the tensors.

    Its fields are of two kinds: those that change what the network answers for a photo
    (:data:`OUTPUT_FIELDS`, part of the version) and provenance (:data:`PROVENANCE_FIELDS`)."""

    name: str
    arch: str
    classes: list[str]
    task: Task = "single_label"
    arch_args: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=Preprocess)
    temperature: float = 1.0  # logits are divided by it before softmax (calibration)
    thresholds: list[float] | None = None  # per class, for multi-label tagging
    vocabulary: dict[str, Any] | None = (
        None  # the tags people see (model.vocabulary); None: classes
    )
    tta: str = "none"  # test-time augmentation the server applies: none | flip | flip_shift
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    training: dict[str, Any] = field(default_factory=dict)  # the TrainConfig that produced it
    description: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {self.format_version} is not supported; this phototag "
                f"reads version {FORMAT_VERSION}: re-export the model with this version"
            )
        if self.arch not in architectures.available():
            raise CheckpointError(
                f"unknown architecture {self.arch!r}; this phototag knows "
                f"{', '.join(architectures.available())}"
            )
        if self.task not in TASKS:
            raise CheckpointError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            raise CheckpointError("the class list must hold at least one non-empty name")
        if len(set(self.classes)) != len(self.classes):
            raise CheckpointError("class names must be unique")
        if not self.temperature > 0:
            raise CheckpointError(f"temperature must be positive, got {self.temperature}")
        if self.thresholds is not None and len(self.thresholds) != len(self.classes):
            raise CheckpointError(
                f"{len(self.thresholds)} thresholds for {len(self.classes)} classes"
            )
        if self.tta not in TTA_NAMES:
            raise CheckpointError(f"tta must be one of {', '.join(TTA_NAMES)}, got {self.tta!r}")
        if self.vocabulary is not None:
            try:
                Vocabulary.from_dict(self.vocabulary, self.classes)
            except VocabularyError as exc:
                raise CheckpointError(f"the card's vocabulary is invalid: {exc}") from None

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"the model card is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError("the model card is not a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {data.get('format_version')!r} is not supported; "
                f"this phototag reads version {FORMAT_VERSION}"
            )
        try:
            data["preprocess"] = Preprocess.from_dict(data.get("preprocess", {}))
            return cls(**data)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the model card is invalid: {exc}") from None

    def build_network(self) -> architectures.TaggerNet:
        try:
            return architectures.build(self.arch, len(self.classes), **self.arch_args)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"cannot build {self.arch!r} from the card's arguments: {exc}"
            ) from None


# The card fields that determine a photo's probabilities and tags; with the tensors, they are
# what the version names. Everything else is provenance: where, when and how the model came to
# be, and how well it measured. A new card field must join one of the two (a test checks).
OUTPUT_FIELDS = (
    "arch", "arch_args", "task", "classes", "preprocess", "temperature", "thresholds", "vocabulary",
    "tta",
)  # fmt: skip
# Output fields added since the version rule was made, left out of the digest at their default
# so that every earlier file keeps its version.
LATER_FIELDS = {"tta": "none"}
PROVENANCE_FIELDS = (
    "name", "metrics", "data_fingerprint", "training", "description", "created_at",
    "format_version",
)  # fmt: skip


def output_version(card: ModelCard, tensors: Mapping[str, torch.Tensor]) -> str:
    """A short digest of what the network computes: the tensors (names, dtypes, shapes, values)
    and the card's :data:`OUTPUT_FIELDS`. Two files that answer every photo alike have one
    version, whenever and wherever they were built."""
    return _digest(card, tensors, OUTPUT_FIELDS)


def _digest(card: ModelCard, tensors: Mapping[str, torch.Tensor], fields: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    outputs = {
        name: getattr(card, name)
        for name in fields
        if name not in LATER_FIELDS or getattr(card, name) != LATER_FIELDS[name]
    }
    outputs["preprocess"] = card.preprocess.to_dict()
    digest.update(json.dumps(outputs, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


# What the class probabilities depend on: every tensor and these card fields. Custom tags read
# the probabilities (model.custom_tags), so this version, not :func:`output_version`, is what
# they are tied to: a new vocabulary or new thresholds leave them valid.
PROBABILITY_FIELDS = ("arch", "arch_args", "task", "classes", "preprocess", "temperature", "tta")


def probabilities_version(card: ModelCard, tensors: Mapping[str, torch.Tensor]) -> str:
    """A short digest of what computes a photo's class probabilities (the backbone, the
    classifier, the temperature): :func:`output_version` without the vocabulary and
    thresholds."""
    return _digest(card, tensors, PROBABILITY_FIELDS)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its card, its tensors, the version of what it computes
    (:func:`output_version`) and the digest of the file's bytes (a provenance-only rewrite
    changes the second, not the first)."""

    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    version: str
    path: Path
    file_digest: str = ""

    def check_tensors(self) -> None:
        """Raise unless the tensors are exactly those the card's network has, shape for shape."""
        with torch.device("meta"):  # shapes only, nothing allocated
            expected = {k: v.shape for k, v in self.card.build_network().state_dict().items()}
        problems = [f"missing {k}" for k in expected if k not in self.state_dict]
        problems += [f"unexpected {k}" for k in self.state_dict if k not in expected]
        problems += [
            f"{k} has shape {tuple(v.shape)}, expected {tuple(expected[k])}"
            for k, v in self.state_dict.items()
            if k in expected and v.shape != expected[k]
        ]
        if problems:
            raise CheckpointError(
                f"{self.path}: the tensors do not match a {self.card.arch} network with "
                f"{len(self.card.classes)} classes ({len(problems)} problems, e.g. "
                f"{'; '.join(problems[:3])})"
            )

    def build_model(self, device: str | torch.device = "cpu") -> architectures.TaggerNet:
        """The network with these weights, in eval mode, on ``device``."""
        net = self.card.build_network()
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path}: the tensors do not match a {self.card.arch} network with "
                f"{len(self.card.classes)} classes: {_first_line(exc)}"
            ) from None
        return net.to(device).eval()


def save(
    path: str | Path, weights: nn.Module | Mapping[str, torch.Tensor], card: ModelCard
) -> Path:
    """Write ``weights`` and ``card`` to ``path`` atomically (temp file in the same folder, fsync,
    rename), so a reader sees the old file or the new one, never half of one."""
    card.validate()
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = save_safetensors_bytes(tensors, metadata={METADATA_KEY: card.to_json()})
    return atomic_write_bytes(path, data)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files: a server running as another user (a container's) must
        # still read what training wrote
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; raise :class:`CheckpointError` on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {path} (build the default one with "
            f"`python -m model.pretrained --out {path}`)"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    card = ModelCard.from_json(_read_card_json(data, path))
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error type for every malformation
        raise CheckpointError(f"{path} is corrupt or truncated: {exc}") from None
    file_digest = hashlib.sha256(data).hexdigest()
    checkpoint = Checkpoint(card, tensors, output_version(card, tensors), path, file_digest)
    checkpoint.check_tensors()
    return checkpoint


def _read_card_json(data: bytes, path: Path) -> str:
    """The model card JSON from a safetensors file's header: 8-byte little-endian header size,
    then a JSON header whose ``__metadata__`` maps strings to strings."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is too short to be a checkpoint (truncated?)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER_BYTES or 8 + size > len(data):
        raise CheckpointError(f"{path} is not a safetensors checkpoint, or it is truncated")
    try:
        header = json.loads(data[8 : 8 + size])
        card_json = header["__metadata__"][METADATA_KEY]
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(
            f"{path} is not a safetensors checkpoint (unreadable header)"
        ) from None
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{path} is a safetensors file without a phototag model card; import plain weights "
            f"with `python -m model.pretrained` or train a model with `python -m model.train`"
        ) from None
    return card_json


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(line.strip() for line in text[:3])[:400]
