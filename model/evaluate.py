"""Evaluate a checkpoint on labelled photos: metrics, calibration, plots; and its CLI.

    python -m model.evaluate --checkpoint best.safetensors --data photos/ [--split test] [--out DIR]

The photos go through :func:`model.preprocess.build_eval_transform` with the checkpoint's own
preprocessing and its temperature, so the numbers describe exactly what the server returns.
Training measures with the same pieces: :func:`predict` and :func:`evaluate_predictions` every
epoch, and :func:`photo_logits`, :func:`evaluation_source` and :func:`save_evaluation` for the
run's final ``val_evaluation.json``/``test_evaluation.json``, the shape this CLI writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from model import data, metrics, plots
from model.checkpoint import Checkpoint, CheckpointError, ModelCard, atomic_write_bytes, load
from model.imageio import open_rgb
from model.preprocess import Preprocess, build_eval_transform
from model.runtime import ConfigError, resolve_device
from model.tta import TTA
from model.vocabulary import Vocabulary, tag_report

SPLITS = ("test", "val", "train", "all")


class EvaluationError(Exception):
    """The photos cannot be evaluated with this checkpoint; the message says why."""


# ---------------------------------------------------------------- reusable pieces


def amp_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's type: float16 on CUDA, bfloat16 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@torch.no_grad()  # not inference_mode: training fits its temperature on these with autograd
def predict(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device,
    temperature: float = 1.0,
    tta: TTA = TTA(),
    amp: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader``: logits / ``temperature`` (N, C) float32 and the targets
    (N,) or (N, C), both on the CPU. ``tta`` averages the logits of views of each photo;
    ``amp`` runs the network in mixed precision (training's epoch validation)."""
    device = torch.device(device)
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)  # (B, 3, H, W)
        if device.type == "cuda" or amp:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            logits = tta.logits(model, images)
        all_logits.append(logits.cpu())
        all_targets.append(torch.as_tensor(targets).cpu())
    if not all_logits:
        raise EvaluationError("no photos to evaluate")
    return torch.cat(all_logits) / temperature, torch.cat(all_targets)


def evaluate_predictions(
    logits: Tensor,
    targets: Tensor,
    classes: list[str],
    task: str = "single_label",
    temperature: float = 1.0,
    thresholds: list[float] | None = None,
    vocabulary: Vocabulary | None = None,
) -> dict:
    """Metrics of raw ``logits`` (N, C) against ``targets``: single-label (N,) class indices or
    multi-label (N, C) 0/1. Probabilities use ``temperature`` as the server does; for a
    single-label task the result also holds the calibration before (T = 1) and after it. With
    a ``vocabulary``, ``tags`` says how the tags the server would return fare
    (:func:`model.vocabulary.tag_report`)."""
    if task == "multi_label":
        probs = torch.sigmoid(logits.float() / temperature)
        result = metrics.multilabel_metrics(probs, targets, classes, thresholds)
        result["thresholds_source"] = "checkpoint" if thresholds is not None else "default 0.5"
    else:
        probs = torch.softmax(logits.float() / temperature, dim=1)
        result = metrics.classification_metrics(probs, targets, classes)
        result["calibration"] = calibration_report(logits, targets, temperature)
    if vocabulary is not None:
        result["tags"] = tag_report(vocabulary, probs, true_classes(targets, task), task)
    return {"task": task, "temperature": temperature, **result}


def true_classes(targets: Tensor, task: str) -> list[set[int]]:
    """Per photo, the indices of its true classes."""
    if task == "multi_label":
        return [set(row.nonzero()[:, 0].tolist()) for row in targets]
    return [{int(target)} for target in targets]


def calibration_report(logits: Tensor, labels: Tensor, temperature: float) -> dict:
    """ECE, NLL and reliability bins of softmax(logits) and of softmax(logits / temperature)."""
    before = metrics.reliability_bins(torch.softmax(logits.float(), dim=1), labels)
    after = metrics.reliability_bins(torch.softmax(logits.float() / temperature, dim=1), labels)
    return {
        "temperature": temperature,
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "nll_before": _nll(logits, labels, 1.0),
        "nll_after": _nll(logits, labels, temperature),
        "reliability_before": before,
        "reliability_after": after,
    }


def _nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    return float(nn.functional.cross_entropy(logits.double() / temperature, labels.long()))


def save_evaluation(result: dict, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Write ``{prefix}evaluation.json`` and the plots that fit the task; return the paths."""
    out_dir = Path(out_dir)
    text = json.dumps(result, indent=2) + "\n"
    written = [atomic_write_bytes(out_dir / f"{prefix}evaluation.json", text.encode())]
    if "confusion_matrix" in result:
        matrix, classes = confusion_for_plot(result)
        path = out_dir / f"{prefix}confusion.png"
        written.append(plots.plot_confusion(matrix, classes, path))
    if result.get("task") == "multi_label":
        path = out_dir / f"{prefix}per_class.png"
        written.append(plots.plot_per_class(result["per_class"], path))
    if "calibration" in result:
        calibration = result["calibration"]
        after = {**calibration["reliability_after"], "temperature": calibration["temperature"]}
        path = out_dir / f"{prefix}reliability.png"
        written.append(plots.plot_reliability(calibration["reliability_before"], after, path))
    return written


def confusion_for_plot(result: dict, max_classes: int = 50) -> tuple[list[list[int]], list[str]]:
    """The confusion matrix restricted to the classes that occur (true or predicted), and to the
    ``max_classes`` most frequent of those: a 1000-class model on a few classes stays readable."""
    matrix = torch.tensor(result["confusion_matrix"])
    classes = list(result["per_class"])
    if len(classes) <= max_classes:
        return matrix.tolist(), classes
    frequency = matrix.sum(0) + matrix.sum(1)  # (C,)
    keep = frequency.argsort(descending=True, stable=True)[:max_classes]
    keep = keep[frequency[keep] > 0].sort().values
    return matrix[keep][:, keep].tolist(), [classes[i] for i in keep]


def summary(result: dict) -> list[str]:
    """A few human lines about ``result`` from :func:`evaluate_predictions`."""
    if result["task"] == "multi_label":
        lines = [
            f"mAP {result['mAP']:.3f}  macro F1 {result['macro_f1']:.3f}  "
            f"micro F1 {result['micro_f1']:.3f}  exact match {result['exact_match']:.1%}  "
            f"(thresholds: {result['thresholds_source']})"
        ]
        if result["ap_skipped"]:
            lines.append(f"no positives, AP skipped: {', '.join(result['ap_skipped'])}")
    else:
        calibration = result["calibration"]
        ece = f"ECE {calibration['ece_after']:.3f} at T={calibration['temperature']:.2f}"
        if calibration["temperature"] != 1.0:
            ece += f" (ECE {calibration['ece_before']:.3f} at T=1)"
        lines = [
            f"accuracy {result['accuracy']:.1%}  top-{result['top5_k']} {result['top5']:.1%}  "
            f"macro F1 {result['macro_f1']:.3f}  NLL {result['nll']:.3f}",
            ece,
        ]
    lines.append("weakest classes: " + _weakest(result["per_class"]))
    if "tags" in result:
        tags = result["tags"]
        lines.append(
            f"tags: precision {_share(tags['precision'])}, {_share(tags['coverage'])} of photos "
            f"tagged, {tags['tags_per_photo']:.2f} tags per photo"
        )
    return lines


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _weakest(per_class: dict[str, dict], count: int = 3) -> str:
    present = [(m["f1"], name) for name, m in per_class.items() if m["support"]]
    return ", ".join(f"{name} F1 {f1:.2f}" for f1, name in sorted(present)[:count]) or "-"


# ---------------------------------------------------------------- photos for a checkpoint


def class_mapping(data_classes: Sequence[str], card: ModelCard) -> list[int]:
    """For each class of the photos, its index among the checkpoint's classes (matched by name)."""
    unknown = [name for name in data_classes if name not in card.classes]
    if unknown:
        raise EvaluationError(
            f"the photos have {len(unknown)} classes the checkpoint does not know: "
            f"{', '.join(unknown)}; the checkpoint's classes are: {', '.join(card.classes)}"
        )
    return [card.classes.index(name) for name in data_classes]


def remap_samples(
    samples: Sequence[data.Sample], mapping: list[int], task: str
) -> list[data.Sample]:
    """Samples whose targets are the checkpoint's class indices; a single-label photo becomes a
    photo with one tag when the checkpoint is multi-label."""
    remapped = []
    for sample in samples:
        if isinstance(sample.target, int):
            target = [mapping[sample.target]] if task == "multi_label" else mapping[sample.target]
        elif task == "multi_label":
            target = [mapping[i] for i in sample.target]
        else:
            raise EvaluationError(
                "the photos carry several tags each (multi-label) but the checkpoint is "
                "single-label; evaluate a multi-label checkpoint on them"
            )
        remapped.append(replace(sample, target=target))
    return remapped


def load_split(args: argparse.Namespace) -> tuple[data.DatasetSpec, str, list[data.Sample]]:
    """The photo set, the split to evaluate (``args.split`` or the default) and its samples.

    The set is read first without a random validation split, which tells whether it has its own
    test/val photos (default ``test``, else ``val``, else ``all``); ``--split val`` or ``train``
    on a set without its own then redraws the training run's split from ``--val-fraction`` and
    ``--seed``."""
    spec = data.load_dataset(args.data, val_fraction=0.0)
    split = args.split or ("test" if spec.test else "val" if spec.val else "all")
    if split in ("val", "train") and not spec.val:
        spec = data.load_dataset(args.data, val_fraction=args.val_fraction, seed=args.seed)
    return spec, split, select_split(spec, split)


def select_split(spec: data.DatasetSpec, split: str) -> list[data.Sample]:
    if split == "all":
        return [*spec.train, *spec.val, *spec.test]
    samples = list(getattr(spec, split))
    if not samples:
        raise EvaluationError(
            f"the photos have no {split!r} split; pick one of --split "
            f"{', '.join(s for s in SPLITS if s == 'all' or getattr(spec, s))}"
        )
    return samples


class TolerantPhotoDataset(data.PhotoDataset):
    """A photo that passed the header check but fails to decode (a truncated JPEG) becomes a
    blank image with target -1, dropped after the forward pass by :func:`drop_undecodable`, so
    one bad file never stops an evaluation (and it works across loader processes)."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        try:
            return super().__getitem__(index)
        except Exception:  # Pillow raises many types for a broken file
            crop = self.transform(Image.new("RGB", (1, 1))).shape[-1]
            target = data.encode_target(0, self.num_classes, self.task)
            return torch.zeros(3, crop, crop), torch.full_like(target, -1)


def drop_undecodable(
    logits: Tensor, targets: Tensor, samples: Sequence[data.Sample]
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """Logits and targets without the rows of photos that failed to decode, and those photos
    as (path, reason) pairs."""
    failed = targets.reshape(len(targets), -1)[:, 0] < 0  # (N,)
    reasons = [
        (str(samples[i].path), _decode_error(samples[i].path)) for i in failed.nonzero()[:, 0]
    ]
    if failed.all():
        raise EvaluationError(f"none of the {len(samples)} photos could be decoded")
    return logits[~failed], targets[~failed], reasons


def _decode_error(path: Path) -> str:
    try:
        open_rgb(str(path))
    except Exception as exc:
        return f"cannot decode ({type(exc).__name__}: {str(exc)[:120]})"
    return "cannot decode"


def photo_logits(
    model: nn.Module,
    samples: Sequence[data.Sample],
    num_classes: int,
    task: str,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    tta: TTA = TTA(),
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """:func:`predict` on photo files through ``build_eval_transform(preprocess)``: the logits
    and targets of the photos that decode, and the (path, reason) of those that do not."""
    dataset = TolerantPhotoDataset(samples, num_classes, task, build_eval_transform(preprocess))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    logits, targets = predict(model, loader, device, tta=tta)
    return drop_undecodable(logits, targets, samples)


def evaluation_source(
    checkpoint: Checkpoint,
    data_source: str | Path,
    split: str,
    tta: TTA,
    skipped: Sequence[tuple[str, str]],
) -> dict:
    """The ``source`` block of an evaluation: which checkpoint, on which photos."""
    return {
        "checkpoint": str(checkpoint.path),
        "checkpoint_version": checkpoint.version,
        "model": checkpoint.card.name,
        "arch": checkpoint.card.arch,
        "data": str(data_source),
        "split": split,
        "tta_flip": tta.flip,
        "tta_shift": tta.shift,
        "skipped": [list(item) for item in skipped],
    }


def default_workers() -> int:
    return min(4, (os.cpu_count() or 1) - 1)


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="phototag evaluate",
        description="Measure a checkpoint on labelled photos (a folder per class, or a CSV/JSONL "
        "manifest): accuracy, top-5, per-class precision/recall/F1, confusion matrix and ECE, "
        "or mAP and F1 for multi-label; writes evaluation.json and PNG plots.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a .safetensors checkpoint")
    parser.add_argument("--data", required=True, type=Path, help="photo folder or manifest")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        help="which photos: default test if the data has a test split, else val if it has a "
        "val folder, else all",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for evaluation.json and plots (default: beside the "
        "checkpoint, eval-<data name>-<split>)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="photos per forward pass")
    parser.add_argument(
        "--workers", type=int, default=None, help="loader processes (default: auto)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)"
    )
    parser.add_argument("--tta-flip", action="store_true", help="average with mirrored photos")
    parser.add_argument(
        "--tta-shift",
        action="store_true",
        help="with --tta-flip: also average views shifted by one pixel (6 in all)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="as in training, for --split val|train on photos without split folders",
    )
    parser.add_argument("--seed", type=int, default=0, help="as in training, for that split")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Evaluate as ``args`` say; return the result written to evaluation.json."""
    checkpoint = load(args.checkpoint)
    card = checkpoint.card
    tta = tta_views(args, card)
    spec, split, samples = load_split(args)
    samples = remap_samples(samples, class_mapping(spec.classes, card), card.task)
    workers = default_workers() if args.workers is None else args.workers
    device = resolve_device(args.device or "auto")
    model = checkpoint.build_model(device)
    logits, targets, undecodable = photo_logits(
        model, samples, len(card.classes), card.task, card.preprocess, device,
        args.batch_size, workers, tta,
    )  # fmt: skip
    vocabulary = Vocabulary.from_dict(card.vocabulary, card.classes) if card.vocabulary else None
    result = evaluate_predictions(
        logits, targets, card.classes, card.task, card.temperature, card.thresholds, vocabulary
    )
    skipped = [*spec.skipped, *undecodable]
    source = evaluation_source(checkpoint, args.data, split, tta, skipped)
    return {"source": source, **result}


def tta_views(args: argparse.Namespace, card: ModelCard) -> TTA:
    """The card's TTA (what the server applies), or the views the flags ask for."""
    try:
        asked = TTA(flip=args.tta_flip, shift=args.tta_shift)
    except ValueError as exc:
        raise ConfigError(f"--tta-shift: {exc}") from None
    return asked if asked.flip else TTA.named(card.tta)


def default_out(args: argparse.Namespace, split: str) -> Path:
    return args.checkpoint.parent / f"eval-{args.data.stem or 'data'}-{split}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (CheckpointError, ConfigError, EvaluationError, data.DataError) as exc:
        print(f"phototag evaluate: error: {exc}", file=sys.stderr)
        return 2
    source = result["source"]
    out = args.out or default_out(args, source["split"])
    written = save_evaluation(result, out)
    print(
        f"{source['model']} ({source['arch']}, {len(result['per_class'])} classes) on "
        f"{source['data']} [{source['split']}]: {result['num_samples']} photos, "
        f"{len(source['skipped'])} unreadable skipped"
    )
    for line in summary(result):
        print("  " + line)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
