"""Photo sets for training and evaluation: folders and manifests, splits, transforms, a cache.

Two layouts are read by :func:`load_dataset`:

* a folder with one sub-folder per class (single-label), optionally split into ``train/``,
  ``val/`` and ``test/`` folders that each hold the class folders; without them a stratified,
  seeded split is made;
* a manifest, CSV or JSONL, with a ``path`` (relative to the manifest's folder) and one or more
  ``tags`` per photo (multi-label when a photo may carry several), and an optional ``split``.

Every photo is opened with :func:`model.imageio.open_rgb`, the one way the project turns a file into
upright RGB. Unreadable files are skipped and listed, never fatal; a class left without photos, or
fewer than two classes, is a :class:`DataError` before any training starts.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from model.imageio import open_rgb
from model.preprocess import (
    INTERPOLATIONS,
    Preprocess,
    build_eval_transform,
    limit_aspect,
    normalize,
    resize,
)

SPLITS = ("train", "val", "test")
TASKS = ("single_label", "multi_label")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
TAG_SEPARATORS = (";", "|")


class DataError(ValueError):
    """The photo set cannot be trained on; the message says why and what to do."""


@dataclass
class Sample:
    path: Path
    target: int | list[int]  # class index (single-label) or list of class indices (multi-label)


@dataclass
class DatasetSpec:
    classes: list[str]
    task: str  # "single_label" | "multi_label"
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------------
# Loading: folders and manifests
# --------------------------------------------------------------------------------------------


def load_dataset(
    source: str | Path, *, val_fraction: float = 0.2, seed: int = 0, task: str | None = None
) -> DatasetSpec:
    """Read a class-folder tree or a manifest into train/val/test samples.

    ``val_fraction`` of each class goes to validation (seeded by ``seed``) unless the source has
    its own split. ``task`` forces single- or multi-label for a manifest (default: multi-label
    when some photo has other than exactly one tag).
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"no photo set at {source}")
    if source.is_file():
        spec = _load_manifest(source, val_fraction, seed, task)
    else:
        spec = _load_folders(source, val_fraction, seed)
    check_classes(spec)
    spec.fingerprint = fingerprint(spec, source if source.is_dir() else source.parent)
    return spec


def _load_folders(root: Path, val_fraction: float, seed: int) -> DatasetSpec:
    split_dirs = {name: root / name for name in SPLITS if (root / name).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"{root} has {', '.join(split_dirs)} folders but no train/ folder")
    skipped: list[tuple[str, str]] = []
    if not split_dirs:
        classes = _class_folders(root)
        samples = _scan_class_folders(root, classes, skipped)
        train, val = stratified_split(samples, val_fraction, seed)
        return DatasetSpec(classes, "single_label", train, val, [], skipped)
    classes = _class_folders(split_dirs["train"])
    splits: dict[str, list[Sample]] = {}
    for name, folder in split_dirs.items():
        extra = sorted(set(_class_folders(folder, required=False)) - set(classes))
        if extra:
            raise DataError(
                f"{folder} has class folders that train/ lacks: {', '.join(extra)}; "
                "every class needs training photos"
            )
        splits[name] = _scan_class_folders(folder, classes, skipped)
    train, val = splits["train"], splits.get("val")
    if val is None:
        train, val = stratified_split(train, val_fraction, seed)
    return DatasetSpec(classes, "single_label", train, val, splits.get("test", []), skipped)


def _class_folders(folder: Path, required: bool = True) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if required and not names:
        raise DataError(
            f"{folder} has no class folders: put each class's photos in a sub-folder named "
            "after the class (or pass a CSV/JSONL manifest)"
        )
    return names


def _scan_class_folders(
    folder: Path, classes: list[str], skipped: list[tuple[str, str]]
) -> list[Sample]:
    samples = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                samples.append(Sample(path, index))
    return keep_readable(samples, skipped)


def _load_manifest(path: Path, val_fraction: float, seed: int, task: str | None) -> DatasetSpec:
    rows = _read_manifest_rows(path)
    if task is None:
        task = "single_label" if all(len(tags) == 1 for _, tags, _ in rows) else "multi_label"
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    classes = sorted({tag for _, tags, _ in rows for tag in tags})
    index = {name: i for i, name in enumerate(classes)}
    skipped: list[tuple[str, str]] = []
    by_split: dict[str, list[Sample]] = defaultdict(list)
    for relative, tags, split in rows:
        if task == "single_label" and len(tags) != 1:
            skipped.append((relative, f"{len(tags)} tags in a single-label manifest"))
            continue
        indices = sorted(index[t] for t in tags)
        target: int | list[int] = indices[0] if task == "single_label" else indices
        by_split[split].append(Sample(path.parent / relative, target))
    splits = {name: keep_readable(samples, skipped) for name, samples in by_split.items()}
    train, val = splits.get("train", []), splits.get("val")
    if val is None:
        train, val = stratified_split(train, val_fraction, seed)
    return DatasetSpec(classes, task, train, val, splits.get("test", []), skipped)


def _read_manifest_rows(path: Path) -> list[tuple[str, list[str], str]]:
    """(relative path, tags, split) per photo; split is ``train`` unless the manifest says."""
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"{path}: a manifest must be .csv or .jsonl")
    try:
        records = (
            _csv_records(path) if path.suffix.lower() == ".csv" else list(_jsonl_records(path))
        )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    rows = []
    for line, record in enumerate(records, start=2 if path.suffix.lower() == ".csv" else 1):
        relative = str(record.get("path") or "").strip()
        if not relative:
            raise DataError(f"{path} line {line}: no path")
        split = str(record.get("split") or "train").strip().lower()
        if split not in SPLITS:
            raise DataError(f"{path} line {line}: split must be train, val or test, got {split!r}")
        rows.append((relative, _tags(record), split))
    if not rows:
        raise DataError(f"{path} lists no photos")
    return rows


def _csv_records(path: Path) -> list[dict[str, object]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if "path" not in fields or not fields & {"tags", "tag", "label", "labels"}:
            raise DataError(f"{path}: a CSV manifest needs a header with `path` and `tags`")
        return list(reader)


def _jsonl_records(path: Path) -> Iterable[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object")
            yield record


def _tags(record: dict[str, object]) -> list[str]:
    """``tags`` as a list, or as one string separated by ``;`` or ``|`` (CSV)."""
    value = next((record[k] for k in ("tags", "tag", "labels", "label") if k in record), None)
    if value is None:
        return []
    if isinstance(value, str):
        for separator in TAG_SEPARATORS:
            value = value.replace(separator, "\n")
        value = value.split("\n")
    return sorted({str(tag).strip() for tag in value if str(tag).strip()})


# --------------------------------------------------------------------------------------------
# Checks, splits, fingerprint
# --------------------------------------------------------------------------------------------


def readable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a training photo (cheap header check), or None when it looks fine.

    Pillow identifies the format from the bytes, so a GIF named ``.jpg`` is fine; a truncated
    image that fails only when decoded is caught later, when the cache decodes it.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # Pillow signals unreadable data with many exception types
        return f"not a readable image ({type(exc).__name__}: {str(exc)[:120]})"
    if width < 1 or height < 1:
        return f"the image has no pixels ({width}x{height})"
    return None


def keep_readable(samples: list[Sample], skipped: list[tuple[str, str]]) -> list[Sample]:
    kept = []
    for sample in samples:
        reason = readable_reason(sample.path)
        if reason is None:
            kept.append(sample)
        else:
            skipped.append((str(sample.path), reason))
    return kept


def check_classes(spec: DatasetSpec) -> None:
    """Raise :class:`DataError` unless there are 2+ classes, each with training photos."""
    if spec.num_classes < 2:
        raise DataError(
            f"need at least 2 classes to train a tagger, found {spec.num_classes}"
            + (f" ({spec.classes[0]})" if spec.classes else "")
        )
    counts = Counter(i for s in spec.train for i in _indices(s.target))
    empty = [name for i, name in enumerate(spec.classes) if counts[i] == 0]
    if empty:
        raise DataError(
            f"{len(empty)} class(es) have no usable training photos: {', '.join(empty[:10])}"
            + (
                f" (and {len(spec.skipped)} files were skipped as unreadable)"
                if spec.skipped
                else ""
            )
        )


def drop_samples(spec: DatasetSpec, failed: dict[str, str]) -> None:
    """Remove the samples whose paths are in ``failed`` (path -> reason), list them as skipped,
    and check the classes again."""
    if not failed:
        return
    for split in SPLITS:
        samples = getattr(spec, split)
        setattr(spec, split, [s for s in samples if str(s.path) not in failed])
    spec.skipped.extend(sorted(failed.items()))
    check_classes(spec)


def _indices(target: int | list[int]) -> list[int]:
    return [target] if isinstance(target, int) else list(target)


def stratified_split(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split with ``val_fraction`` of every class in validation (at least one photo of
    each class with two or more). Multi-label photos are grouped by their rarest tag."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    counts = Counter(i for s in samples for i in _indices(s.target))
    groups: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        indices = _indices(sample.target)
        key = min(indices, key=lambda i: (counts[i], i)) if indices else -1
        groups[key].append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda s: str(s.path))
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train, key=_sort_key), sorted(val, key=_sort_key)


def _sort_key(sample: Sample) -> tuple[str, str]:
    return str(sample.target), str(sample.path)


def fingerprint(spec: DatasetSpec, root: Path) -> str:
    """sha256 over classes, task and each photo's split, relative path, byte size and labels:
    the same photos with the same labels give the same fingerprint wherever they are copied."""
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.classes, spec.task]).encode())
    for split in SPLITS:
        for sample in sorted(getattr(spec, split), key=lambda s: str(s.path)):
            try:
                relative = sample.path.relative_to(root).as_posix()
            except ValueError:
                relative = sample.path.as_posix()
            size = sample.path.stat().st_size
            digest.update(f"{split}\t{relative}\t{size}\t{_indices(sample.target)}\n".encode())
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Decoded-image cache
# --------------------------------------------------------------------------------------------


def decode_at_working_size(path: str | Path, pre: Preprocess) -> torch.Tensor:
    """A photo -> uint8 (3, H, W) at the working size, by :func:`model.preprocess.resize`, the
    server's own resize: :func:`build_eval_transform` then only crops it, so validation sees
    exactly the pixels the server would feed the network."""
    return TF.pil_to_tensor(resize(open_rgb(str(path)), pre))  # (3, H, W) uint8


class ImageCache:
    """Every photo decoded once, at the working resolution, kept in memory as uint8.

    Epochs then cost augmentation and the network, not JPEG decoding. Photos that fail to
    decode are in :attr:`failed` (path -> reason) rather than raising.
    """

    def __init__(self, pre: Preprocess):
        self.pre = pre
        self.images: dict[str, torch.Tensor] = {}
        self.failed: dict[str, str] = {}

    def add(
        self,
        paths: Iterable[str | Path],
        threads: int = 4,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        todo = sorted({str(p) for p in paths} - set(self.images) - set(self.failed))
        with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes without the GIL
            for path, result in zip(todo, pool.map(self._decode, todo), strict=True):
                if isinstance(result, torch.Tensor):
                    self.images[path] = result
                else:
                    self.failed[path] = result
                if progress:
                    progress(1)

    def _decode(self, path: str) -> torch.Tensor | str:
        try:
            return decode_at_working_size(path, self.pre)
        except Exception as exc:  # a photo that cannot be decoded is skipped, not fatal
            return f"cannot decode ({type(exc).__name__}: {str(exc)[:120]})"

    def get(self, path: str | Path) -> torch.Tensor:
        return self.images[str(path)]

    def __contains__(self, path: object) -> bool:
        return str(path) in self.images

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.images.values())

    def stack(self, samples: Sequence[Sample]) -> torch.Tensor | None:
        """(N, 3, H, W) uint8 of these samples when every image has the same size, else None."""
        images = [self.images[str(s.path)] for s in samples]
        if not images or any(t.shape != images[0].shape for t in images):
            return None
        return torch.stack(images)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass
class Augment:
    """Training augmentation; each part can be switched off."""

    random_resized_crop: bool = True  # zoom: crop a random area, resize it to the crop size
    crop_scale_min: float = 0.25  # smallest crop area, as a fraction of the image
    hflip: bool = True  # mirror left-right with probability 1/2
    alternate_flip: bool = False  # hflip: a random half in epoch 1, then each photo every other
    vflip: bool = False  # mirror top-bottom (aerial or microscope photos)
    translate: float = 0.0  # shift by up to this fraction of the crop size (reflect padding)
    color_jitter: float = 0.2  # brightness/contrast/saturation +-this, hue +-this/4; 0 = off
    trivial_augment: bool = False  # TrivialAugmentWide: one random op at random strength
    random_erasing: float = 0.0  # probability of erasing a random rectangle

    @property
    def batchable(self) -> bool:
        """Only shifts and flips: then whole batches of equal-size tensors are augmented at once."""
        return not (
            self.random_resized_crop
            or self.color_jitter
            or self.trivial_augment
            or self.random_erasing
        )


def build_train_transform(pre: Preprocess, aug: Augment) -> T.Compose:
    """PIL image or uint8 tensor (3, H, W) -> augmented, normalised float (3, crop, crop)."""
    interpolation = INTERPOLATIONS[pre.interpolation].torchvision
    steps: list[Callable] = [_limit_aspect_of_pil, T.PILToTensor()]
    if aug.random_resized_crop:
        steps.append(
            T.RandomResizedCrop(
                pre.crop,
                scale=(aug.crop_scale_min, 1.0),
                interpolation=interpolation,
                antialias=True,
            )
        )
    else:
        steps += [
            T.Resize(pre.resize, interpolation=interpolation, antialias=True),
            T.RandomCrop(pre.crop),
        ]
    if aug.translate > 0:
        steps.append(
            T.RandomCrop(pre.crop, padding=_shift_pixels(pre, aug), padding_mode="reflect")
        )
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(T.RandomVerticalFlip())
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5)))
    if aug.trivial_augment:
        steps.append(T.TrivialAugmentWide(interpolation=interpolation))
    steps.append(functools.partial(normalize, pre=pre))
    if aug.random_erasing > 0:
        steps.append(T.RandomErasing(p=aug.random_erasing))
    return T.Compose(steps)


def _limit_aspect_of_pil(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """Cached tensors were limited when decoded; a photo opened from disk is limited here."""
    return limit_aspect(image) if isinstance(image, Image.Image) else image


def _shift_pixels(pre: Preprocess, aug: Augment) -> int:
    return max(1, round(aug.translate * pre.crop))


def augment_batch(
    images: torch.Tensor, pre: Preprocess, aug: Augment, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """The batched twin of :func:`build_train_transform` for ``aug.batchable`` settings:
    uint8 (B, 3, H, W) at the working size -> normalised float (B, 3, crop, crop). ``flips``
    (B,) bool says which photos to mirror (alternating flips); None: each with probability 1/2."""
    batch, _, height, width = images.shape
    pad = _shift_pixels(pre, aug) if aug.translate > 0 else 0
    if pad:
        images = torch.nn.functional.pad(images.float(), (pad,) * 4, mode="reflect")
    # random crop per photo: a shift of up to ``pad`` px plus any room the working size leaves
    top = torch.randint(0, height + 2 * pad - pre.crop + 1, (batch,)).tolist()
    left = torch.randint(0, width + 2 * pad - pre.crop + 1, (batch,)).tolist()
    crops = torch.stack(
        [
            image[:, y : y + pre.crop, x : x + pre.crop]
            for image, y, x in zip(images, top, left, strict=True)
        ]
    )
    if aug.hflip:
        if flips is None:
            flips = torch.rand(batch) < 0.5
        crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
    if aug.vflip:
        crops = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, crops.flip(-2), crops)
    return normalize(crops, pre)


# --------------------------------------------------------------------------------------------
# Datasets and loaders
# --------------------------------------------------------------------------------------------


def encode_target(target: int | list[int], num_classes: int, task: str) -> torch.Tensor:
    """int64 scalar class index, or a float multi-hot (num_classes,) for multi-label."""
    if task == "single_label":
        return torch.tensor(target, dtype=torch.int64)
    multi_hot = torch.zeros(num_classes, dtype=torch.float32)
    multi_hot[_indices(target)] = 1.0
    return multi_hot


class PhotoDataset(Dataset):
    """``(image_tensor, target)`` per sample: the photo (from ``cache`` when it holds it, else
    opened with :func:`open_rgb`) through ``transform``, and :func:`encode_target`'s target."""

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        task: str,
        transform: Callable,
        cache: ImageCache | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.task = task
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        if self.cache is not None and sample.path in self.cache:
            image = self.cache.get(sample.path)
        else:
            image = open_rgb(str(sample.path))
        return self.transform(image), encode_target(sample.target, self.num_classes, self.task)

    def targets(self) -> torch.Tensor:
        """(N,) class indices, or (N, C) multi-hot, of every sample."""
        return torch.stack(
            [encode_target(s.target, self.num_classes, self.task) for s in self.samples]
        )


def make_eval_loader(
    samples: Sequence[Sample],
    classes: Sequence[str] | int,
    task: str,
    preprocess: Preprocess,
    batch_size: int = 64,
    workers: int = 0,
    cache: ImageCache | None = None,
) -> DataLoader:
    """Batches ``(images (B, 3, crop, crop), targets)`` in sample order, through the one eval
    transform, ``build_eval_transform(preprocess)``. ``classes`` is the class list or its length.
    """
    num_classes = classes if isinstance(classes, int) else len(classes)
    dataset = PhotoDataset(samples, num_classes, task, build_eval_transform(preprocess), cache)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
