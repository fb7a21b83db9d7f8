"""PNG plots of a run: learning curves, confusion matrix, reliability diagram.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global backend
state, safe in any thread) and written atomically: a temp file in the same folder, then a rename.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

LOSS_KEYS = ("train_loss", "val_loss")
SCORE_KEYS = ("train_acc", "val_acc", "val_top5", "val_mAP", "val_macro_f1")
_BEFORE, _AFTER = "tab:red", "tab:blue"


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG to ``path`` through a temp file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            figure.savefig(f, format="png", dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- learning curves


def plot_history(history: list[dict], path: str | Path) -> Path:
    """Loss (left) and accuracy-like scores (right) per epoch, train vs val. Rows may lack any key;
    a row without ``epoch`` counts as the next epoch."""
    figure = Figure(figsize=(11, 4.2))
    loss_axes, score_axes = figure.subplots(1, 2)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    _plot_series(loss_axes, history, epochs, LOSS_KEYS, "loss")
    _plot_series(score_axes, history, epochs, SCORE_KEYS, "score")
    figure.suptitle("Training history")
    return save_figure(figure, path)


def _plot_series(axes, history: list[dict], epochs: list, keys: Sequence[str], ylabel: str) -> None:
    plotted = False
    for key in keys:
        points = [(e, _number(row.get(key))) for e, row in zip(epochs, history, strict=True)]
        points = [(e, v) for e, v in points if v is not None]
        if not points:
            continue
        x, y = zip(*points, strict=True)
        style = "--" if key.startswith("train") else "-"
        axes.plot(x, y, style, marker="o", markersize=3, label=key)
        plotted = True
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if plotted:
        axes.legend()
    else:
        _no_data(axes)


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _no_data(axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)


# ---------------------------------------------------------------- confusion matrix


def plot_confusion(matrix: Sequence[Sequence[int]], classes: list[str], path: str | Path) -> Path:
    """Rows (true class) normalised to sum to 1 as colour, with the raw counts written in each
    cell; sized and lettered to stay readable up to about 50 classes."""
    counts = np.asarray(matrix, dtype=np.int64).reshape(len(classes), len(classes))
    row_totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    n = len(classes)
    side = min(4 + 0.38 * n, 24)
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.subplots()
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    font = 10 if n <= 12 else 8 if n <= 25 else 7
    axes.set_xticks(range(n), labels=classes, rotation=90, fontsize=font)
    supports = [f"{c} ({t})" for c, t in zip(classes, row_totals[:, 0], strict=True)]
    axes.set_yticks(range(n), labels=supports, fontsize=font)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (support)")
    _write_counts(axes, counts, normalised, font)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set_title(f"Confusion matrix: accuracy {accuracy:.1%} on {counts.sum()} photos")
    return save_figure(figure, path)


def _write_counts(axes, counts: np.ndarray, normalised: np.ndarray, font: int) -> None:
    for (row, col), count in np.ndenumerate(counts):
        if count == 0 and (row != col or normalised[row].sum() == 0):
            continue  # empty cells stay blank (bar a missed diagonal) so the errors stand out
        colour = "white" if normalised[row, col] > 0.5 else "black"
        axes.text(col, row, str(count), ha="center", va="center", fontsize=font, color=colour)


# ---------------------------------------------------------------- reliability diagram


def plot_reliability(bins_before: dict, bins_after: dict | None, path: str | Path) -> Path:
    """Reliability diagram from :func:`model.metrics.reliability_bins` results: accuracy against
    confidence per bin, before (bars) and after (line) temperature scaling, with the ECE of each in
    the legend; below, how many photos fall in each bin. A ``temperature`` key in ``bins_after``
    is shown in its label."""
    figure = Figure(figsize=(6, 7))
    curve, histogram = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    _bars(curve, histogram, bins_before, _BEFORE, _label("before", bins_before))
    if bins_after is not None:
        after_label = _label("after", bins_after)
        _line(curve, histogram, bins_after, _AFTER, after_label)
    curve.set_xlim(0, 1)
    curve.set_ylim(0, 1)
    curve.set_ylabel("accuracy")
    curve.set_title("Reliability diagram (top-1 confidence)")
    handles, labels = curve.get_legend_handles_labels()
    order = sorted(
        range(len(labels)),
        key=lambda i: ("perfect", "before", "after").index(labels[i].split(" ")[0].rstrip(",")),
    )
    curve.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left")
    curve.grid(alpha=0.3)
    histogram.set_xlabel("confidence")
    histogram.set_ylabel("photos")
    histogram.grid(alpha=0.3)
    return save_figure(figure, path)


def _label(stage: str, bins: dict) -> str:
    temperature = bins.get("temperature")
    scaled = f", T={temperature:.2f}" if temperature is not None else ""
    return f"{stage}{scaled} (ECE {bins.get('ece', float('nan')):.3f})"


def _bars(curve, histogram, bins: dict, colour: str, label: str) -> None:
    rows = bins["bins"]
    centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
    width = rows[0]["upper"] - rows[0]["lower"] if rows else 0.1
    accuracy = [r["accuracy"] or 0.0 for r in rows]
    curve.bar(
        centres, accuracy, width=width, color=colour, alpha=0.35, edgecolor=colour, label=label
    )
    histogram.bar(centres, [r["count"] for r in rows], width=width, color=colour, alpha=0.35)


def _line(curve, histogram, bins: dict, colour: str, label: str) -> None:
    rows = [r for r in bins["bins"] if r["count"]]
    curve.plot(
        [r["confidence"] for r in rows],
        [r["accuracy"] for r in rows],
        "-o",
        color=colour,
        markersize=4,
        label=label,
    )
    centres = [(r["lower"] + r["upper"]) / 2 for r in bins["bins"]]
    histogram.step(centres, [r["count"] for r in bins["bins"]], where="mid", color=colour)


# ---------------------------------------------------------------- per-class scores


def plot_per_class(per_class: dict[str, dict], path: str | Path, keys=("ap", "f1")) -> Path:
    """Horizontal bars of per-class scores (multi-label: AP and F1 at the thresholds), best at the
    top by the first key; a class without a score (AP without positives) gets no bar."""
    names = sorted(per_class, key=lambda c: _number(per_class[c].get(keys[0])) or -1.0)
    height = 0.8 / len(keys)
    figure = Figure(figsize=(7, min(2 + 0.32 * len(names) * len(keys), 40)))
    axes = figure.subplots()
    for offset, key in enumerate(keys):
        values = [_number(per_class[c].get(key)) for c in names]
        rows = [i + offset * height for i, v in enumerate(values) if v is not None]
        label = key.upper() if len(key) <= 3 else key
        axes.barh(rows, [v for v in values if v is not None], height=height, label=label)
    supports = [f"{c} ({per_class[c].get('support', '?')})" for c in names]
    axes.set_yticks([i + height * (len(keys) - 1) / 2 for i in range(len(names))], labels=supports)
    axes.set_xlim(0, 1)
    axes.set_xlabel("score")
    axes.set_ylabel("class (positives)")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("Per-class scores")
    return save_figure(figure, path)
