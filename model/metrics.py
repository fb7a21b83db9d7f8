"""Metrics and calibration on tensors: pure functions, no files, no model.

Single-label inputs are ``probs`` (N, C) rows summing to 1 (or ``logits`` (N, C)) with integer
``labels`` (N,). Multi-label inputs are ``probs`` (N, C) of independent sigmoids with 0/1
``targets`` (N, C). Every result is plain Python (floats, lists, dicts), ready for JSON.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

TEMPERATURE_RANGE = (0.05, 20.0)  # beyond this a model is broken, not miscalibrated
_EPS = 1e-12


# ---------------------------------------------------------------- calibration (single-label)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on (validation) data.

    Optimises log T with LBFGS, clamps T to :data:`TEMPERATURE_RANGE`, and returns 1.0 when the
    data is empty, when every prediction is right (the NLL then falls without end as T -> 0:
    the data cannot say how confident to be, and the fit would make every answer near-certain),
    or when the fitted T does not lower the NLL (nothing to fix, or a failed fit)."""
    if logits.numel() == 0 or len(labels) == 0:
        return 1.0
    logits = logits.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if bool((logits.argmax(dim=1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=0.5, max_iter=200, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    temperature = float(log_t.detach().exp().clamp(low, high))
    if not math.isfinite(temperature):
        return 1.0
    before = _nll(logits, labels, 1.0)
    after = _nll(logits, labels, temperature)
    return temperature if after < before else 1.0


def _nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


def reliability_bins(probs: Tensor, labels: Tensor, bins: int = 15) -> dict:
    """Top-1 confidence split into ``bins`` equal-width bins over (0, 1].

    Returns ``{"bins": [{"lower", "upper", "confidence", "accuracy", "count"}, ...], "ece",
    "num_samples"}``; an empty bin has ``confidence`` and ``accuracy`` None."""
    confidence, correct = _top1(probs, labels)
    index = _bin_index(confidence, bins)
    count = torch.bincount(index, minlength=bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    rows = []
    for b in range(bins):
        n = int(count[b])
        rows.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "confidence": float(conf_sum[b] / n) if n else None,
                "accuracy": float(correct_sum[b] / n) if n else None,
                "count": n,
            }
        )
    total = len(confidence)
    gap = (conf_sum - correct_sum).abs().sum()  # sum_b n_b * |conf_b - acc_b|
    return {"bins": rows, "ece": float(gap / total) if total else 0.0, "num_samples": total}


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between top-1 confidence and accuracy over the bins."""
    return reliability_bins(probs, labels, bins)["ece"]


def _top1(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C) probabilities -> top-1 confidence (N,) and correctness as 0./1. (N,), float64."""
    probs = probs.detach().double().cpu()
    confidence, predicted = probs.max(dim=1)
    return confidence, (predicted == labels.detach().long().cpu()).double()


def _bin_index(confidence: Tensor, bins: int) -> Tensor:
    # bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 falls into bin 0
    return (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)


# ---------------------------------------------------------------- single-label


def classification_metrics(probs: Tensor, labels: Tensor, classes: list[str]) -> dict:
    """Accuracy, top-k (k = min(5, C)), per-class precision/recall/F1/support, macro F1,
    confusion matrix (rows = true class, columns = predicted), ECE and NLL."""
    probs = probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    num_classes = len(classes)
    k = min(5, num_classes)
    predicted = probs.argmax(dim=1)
    confusion = torch.bincount(
        labels * num_classes + predicted, minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    true_positives = confusion.diag()
    per_class = _precision_recall_f1(
        true_positives, confusion.sum(dim=0), confusion.sum(dim=1), classes
    )
    topk = probs.topk(k, dim=1).indices  # (N, k)
    n = len(labels)
    return {
        "num_samples": n,
        "accuracy": _ratio(int(true_positives.sum()), n),
        "top5": _ratio(int((topk == labels[:, None]).any(dim=1).sum()), n),
        "top5_k": k,
        "macro_f1": _macro_f1(per_class),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "ece": expected_calibration_error(probs, labels) if n else 0.0,
        "nll": _mean_nll(probs, labels),
    }


def _mean_nll(probs: Tensor, labels: Tensor) -> float:
    if len(labels) == 0:
        return 0.0
    true_class = probs.gather(1, labels[:, None]).squeeze(1)
    return float(-true_class.clamp_min(_EPS).log().mean())


def _precision_recall_f1(
    true_positives: Tensor, predicted_count: Tensor, actual_count: Tensor, classes: list[str]
) -> dict[str, dict]:
    """Per class from counts; 0 where a ratio has nothing to divide (as scikit-learn does)."""
    result = {}
    for i, name in enumerate(classes):
        tp, predicted, actual = (
            int(true_positives[i]),
            int(predicted_count[i]),
            int(actual_count[i]),
        )
        result[name] = {
            "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, actual),
            "f1": _ratio(2 * tp, predicted + actual),
            "support": actual,
            "predicted": predicted,
        }
    return result


def _macro_f1(per_class: dict[str, dict]) -> float:
    """Mean F1 over classes that occur in the labels or the predictions (an absent class that is
    never predicted says nothing either way)."""
    scores = [m["f1"] for m in per_class.values() if m["support"] or m["predicted"]]
    return sum(scores) / len(scores) if scores else 0.0


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


# ---------------------------------------------------------------- multi-label


def multilabel_metrics(
    probs: Tensor, targets: Tensor, classes: list[str], thresholds: list[float] | None = None
) -> dict:
    """Macro mAP over classes with at least one positive (the others are listed in
    ``ap_skipped``), per-class AP/precision/recall/F1 at ``thresholds`` (0.5 each by default),
    macro and micro F1, and exact-match (subset) accuracy."""
    probs = probs.detach().double().cpu()
    targets = targets.detach().cpu().bool()
    num_classes = len(classes)
    threshold_values = [0.5] * num_classes if thresholds is None else [float(t) for t in thresholds]
    if len(threshold_values) != num_classes:
        raise ValueError(f"{len(threshold_values)} thresholds for {num_classes} classes")
    predicted = probs >= torch.tensor(threshold_values, dtype=torch.float64)  # (N, C)
    true_positives = (predicted & targets).sum(dim=0)
    per_class = _precision_recall_f1(
        true_positives, predicted.sum(dim=0), targets.sum(dim=0), classes
    )
    skipped = []
    for i, name in enumerate(classes):
        per_class[name]["threshold"] = threshold_values[i]
        per_class[name]["ap"] = average_precision(probs[:, i], targets[:, i])
        if per_class[name]["ap"] is None:
            skipped.append(name)
    aps = [m["ap"] for m in per_class.values() if m["ap"] is not None]
    tp, n_predicted, n_actual = int(true_positives.sum()), int(predicted.sum()), int(targets.sum())
    return {
        "num_samples": len(probs),
        "mAP": sum(aps) / len(aps) if aps else 0.0,
        "ap_skipped": skipped,
        "macro_f1": _macro_f1(per_class),
        "micro_f1": _ratio(2 * tp, n_predicted + n_actual),
        "micro_precision": _ratio(tp, n_predicted),
        "micro_recall": _ratio(tp, n_actual),
        "exact_match": _ratio(int((predicted == targets).all(dim=1).sum()), len(probs)),
        "per_class": per_class,
    }


def average_precision(scores: Tensor, positives: Tensor) -> float | None:
    """Area under the step precision-recall curve, sum_k (R_k - R_{k-1}) P_k over distinct score
    thresholds (tied scores count as one, as in scikit-learn); None without positives."""
    _, true_positives, false_positives = _ranked_counts(scores, positives)
    total_positives = int(positives.sum())
    if total_positives == 0:
        return None
    precision = true_positives / (true_positives + false_positives)
    recall_gain = torch.diff(true_positives, prepend=torch.zeros(1, dtype=torch.float64))
    return float((recall_gain * precision).sum() / total_positives)


def _ranked_counts(scores: Tensor, positives: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct scores, highest first (G,), and the cumulative true and false positives (G,) when
    everything scoring at least that much is called positive."""
    scores = scores.detach().double().cpu()
    positives = positives.detach().cpu().double()
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positives = scores[order], positives[order]
    tp = positives.cumsum(0)
    fp = (1 - positives).cumsum(0)
    group_end = torch.ones(len(scores), dtype=torch.bool)
    group_end[:-1] = scores[:-1] != scores[1:]
    return scores[group_end], tp[group_end], fp[group_end]


def tune_thresholds(probs: Tensor, targets: Tensor) -> list[float]:
    """Per class, the threshold (``prob >= t`` means tagged) with the best F1 on this data.

    F1 is constant between neighbouring distinct scores; among the best intervals the one nearest
    0.5 wins, and inside it the threshold is 0.5 if the interval holds it, else its midpoint (a
    margin on both sides). A class without positives keeps 0.5."""
    targets = targets.detach().cpu().bool()
    return [_best_threshold(probs[:, i], targets[:, i]) for i in range(probs.shape[1])]


def _best_threshold(scores: Tensor, positives: Tensor) -> float:
    total_positives = int(positives.sum())
    if total_positives == 0 or len(scores) == 0:
        return 0.5
    distinct, tp, fp = _ranked_counts(scores, positives)
    f1 = 2 * tp / (tp + fp + total_positives)  # (G,) calling the top k+1 groups positive
    # interval k of thresholds (lower, upper] calls exactly the top k+1 groups positive
    upper = distinct.tolist()
    lower = [*upper[1:], min(0.0, upper[-1])]
    best = float(f1.max())
    candidates = [k for k in range(len(upper)) if f1[k] >= best - 1e-12]
    k = min(candidates, key=lambda i: _distance_to_half(lower[i], upper[i]))
    if lower[k] < 0.5 <= upper[k]:
        return 0.5
    return (lower[k] + upper[k]) / 2


def _distance_to_half(lower: float, upper: float) -> float:
    if lower < 0.5 <= upper:
        return 0.0
    return lower - 0.5 if lower >= 0.5 else 0.5 - upper
