"""The end of a run: calibrate the best checkpoint on the validation split, measure it the way
``phototag-evaluate`` does (the same functions, on the photo files), and write its final card,
its evaluations, the run's report and the history plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import checkpoint, data, evaluate, metrics, plots
from model.checkpoint import atomic_write_bytes, save
from model.training.loop import BEST_FILE, Trainer
from model.tta import TTA
from model.vocabulary import SEPARATOR, Vocabulary, apply_thresholds, fit_thresholds

CARD_METRIC_KEYS = (
    "num_samples", "accuracy", "top5", "macro_f1", "micro_f1", "mAP", "nll",
    "ece_before", "ece_after", "ece", "exact_match",
)  # fmt: skip


def finalize(trainer: Trainer) -> dict[str, Any]:
    """Calibrate and measure the best checkpoint; write its final card, ``val_evaluation.json``
    (``val_tta_`` with ``--tta-flip``, ``test_`` with a test split) with their plots,
    ``report.json`` and ``history.png``. Returns the evaluations by name and the run's facts."""
    out, spec = trainer.out, trainer.spec
    best = checkpoint.load(out / BEST_FILE)
    net = best.build_model(trainer.device)  # exactly the served tensors
    names = [
        "val",  # as served: with the run's TTA when the card asks for it
        *(["val_tta"] if trainer.cfg.tta_flip and not trainer.cfg.serve_tta else []),
        *(["test"] if spec.test else []),
    ]
    measured = {name: measure(trainer, best, net, name) for name in names}
    temperature, thresholds = calibrate(*measured["val"][:2], spec.task)
    tags = tag_vocabulary(
        spec.classes, *measured["val"][:2], spec.task, temperature, trainer.cfg.tag_precision
    )
    results = {
        name: evaluate.evaluate_predictions(
            logits, targets, spec.classes, spec.task, temperature, thresholds, tags
        )
        for name, (logits, targets, _) in measured.items()
    }
    facts = run_facts(trainer)
    card = trainer.card(
        temperature=temperature,
        thresholds=thresholds,
        vocabulary=tags.to_dict() if tags else None,
        metrics=card_metrics(results, facts["best_epoch"]),
    )
    final = checkpoint.load(save(out / BEST_FILE, best.state_dict, card))
    for name, result in results.items():
        skipped = [*spec.skipped, *measured[name][2]]
        source = evaluate.evaluation_source(
            final, trainer.cfg.data, split_of(name), tta_of(trainer, name), skipped
        )
        evaluate.save_evaluation({"source": source, **result}, out, prefix=f"{name}_")
    write_json(out / "report.json", run_report(trainer, facts))
    plots.plot_history(trainer.progress.history, out / "history.png")
    return results | {"training": facts}


def split_of(name: str) -> str:
    return name.removesuffix("_tta")


def tta_of(trainer: Trainer, name: str) -> TTA:
    """The views of evaluation ``name``: the run's TTA for ``val_tta``, else those served."""
    return trainer.cfg.tta if name.endswith("_tta") else trainer.cfg.served_tta


def measure(
    trainer: Trainer, best: checkpoint.Checkpoint, net: nn.Module, name: str
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Raw logits, targets and undecodable photos of evaluation ``name``'s split, read from the
    photo files through the checkpoint's preprocessing, as the evaluate CLI reads them."""
    spec, cfg = trainer.spec, trainer.cfg
    return evaluate.photo_logits(
        net, getattr(spec, split_of(name)), spec.num_classes, spec.task, best.card.preprocess,
        trainer.device, 2 * cfg.batch_size, cfg.workers, tta=tta_of(trainer, name),
    )  # fmt: skip


def calibrate(
    logits: torch.Tensor, targets: torch.Tensor, task: str
) -> tuple[float, list[float] | None]:
    """Fitted on validation: the temperature (single-label), or per-tag thresholds tuned for F1
    (multi-label, temperature 1)."""
    if task == "single_label":
        return metrics.fit_temperature(logits, targets), None
    return 1.0, metrics.tune_thresholds(torch.sigmoid(logits), targets)


def tag_vocabulary(
    classes: list[str],
    logits: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    temperature: float,
    precision: float,
) -> Vocabulary | None:
    """When the photos' tags are paths (``animal/insect/bee``), the vocabulary they make, its
    thresholds fitted on validation to ``precision`` (tags without enough examples: 0.5);
    else None, and the classes are the tags."""
    if not any(SEPARATOR in name for name in classes):
        return None
    tree = Vocabulary.from_paths({name: name for name in classes}, classes)
    scaled = logits.float() / temperature
    probabilities = torch.sigmoid(scaled) if task == "multi_label" else scaled.softmax(1)
    truths = evaluate.true_classes(targets, task)
    fitted = fit_thresholds(tree, probabilities, truths, task, precision)
    data = tree.to_dict()
    apply_thresholds(data, fitted, default=0.5)
    return Vocabulary.from_dict(data, classes)


def card_metrics(results: dict[str, dict], best_epoch: int) -> dict[str, Any]:
    """The headline numbers for the card (``val_accuracy``, ``val_ece_after``, ...); the detail
    stays in the evaluation files."""
    summary: dict[str, Any] = {}
    for split in ("val", "test"):
        if split in results:
            flat = results[split] | results[split].get("calibration", {})
            summary |= {f"{split}_{key}": flat[key] for key in CARD_METRIC_KEYS if key in flat}
    if "accuracy" in results.get("val_tta", {}):  # single-label
        summary["val_accuracy_tta"] = results["val_tta"]["accuracy"]
    return summary | {"best_epoch": best_epoch}


def run_facts(trainer: Trainer) -> dict[str, Any]:
    progress = trainer.progress
    return {
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "stopped_early": progress.stopped_early,
        "train_seconds": round(progress.train_seconds, 1),
        "world_size": trainer.ddp.world,
        "device": str(trainer.device),
    }


def run_report(trainer: Trainer, facts: dict[str, Any]) -> dict[str, Any]:
    spec = trainer.spec
    return {
        "data": trainer.cfg.data,
        "fingerprint": spec.fingerprint,
        "classes": spec.classes,
        "task": spec.task,
        "counts": {split: len(getattr(spec, split)) for split in data.SPLITS},
        "skipped": [{"path": path, "reason": reason} for path, reason in spec.skipped],
        "cache_bytes": trainer.cache.nbytes() if trainer.cache else 0,
        "training": facts,
        "config": trainer.cfg.to_dict(),
    }


def write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, default=float).encode())


def summary_line(results: dict[str, Any], out: Path) -> str:
    val = results["val"]
    if val["task"] == "multi_label":
        score = f"val mAP {val['mAP']:.4f}, macro F1 {val['macro_f1']:.4f}"
    else:
        score = f"val accuracy {val['accuracy']:.4f}"
        if "val_tta" in results:
            score += f" (TTA {results['val_tta']['accuracy']:.4f})"
        calibration = val["calibration"]
        score += (
            f", ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} "
            f"at T={calibration['temperature']:.3f}"
        )
    if "tags" in val:
        score += f"; tags: precision {val['tags']['precision'] or 0:.3f}, "
        score += f"{val['tags']['coverage'] or 0:.0%} of photos tagged"
    seconds = results["training"]["train_seconds"]
    return f"done: {score}; {seconds:.0f}s training; best checkpoint {out / BEST_FILE}"
