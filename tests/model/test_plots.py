"""Plots: each writes a real PNG atomically, and copes with missing or odd inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model import plots
from model.metrics import reliability_bins

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_side: int = 300) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert min(image.size) >= min_side
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_plot_history_draws_train_and_val_curves(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "train_acc": 1 - 1 / (e + 1),
            "val_acc": 0.9 - 1 / (e + 2),
            "lr": 0.01,
        }
        for e in range(1, 6)
    ]
    assert_png(plots.plot_history(history, tmp_path / "history.png"))


def test_plot_history_tolerates_missing_keys_and_values(tmp_path):
    history = [{"train_loss": 1.0}, {"epoch": 2, "val_acc": None}, {"val_loss": "nan"}, {}]
    assert_png(plots.plot_history(history, tmp_path / "sparse.png"))
    assert_png(plots.plot_history([], tmp_path / "empty.png"))


@pytest.mark.parametrize("num_classes", [2, 50])
def test_plot_confusion_handles_few_and_many_classes(tmp_path, num_classes):
    # mostly right, a sprinkling of errors: as a trained model's matrix looks
    errors = torch.randint(0, 3, (num_classes, num_classes)) * (
        torch.rand(num_classes, num_classes) < 0.1
    )
    matrix = (torch.eye(num_classes, dtype=torch.long) * 30 + errors).tolist()
    matrix[0] = [0] * num_classes  # a class without photos
    classes = [f"class_{i}" for i in range(num_classes)]
    path = plots.plot_confusion(matrix, classes, tmp_path / "sub" / "confusion.png")
    assert_png(path, min_side=300 if num_classes < 10 else 1500)


def test_plot_reliability_before_and_after(tmp_path):
    probs = torch.softmax(torch.randn(200, 4) * 3, dim=1)
    labels = torch.randint(0, 4, (200,))
    before = reliability_bins(probs, labels)
    after = {**reliability_bins(torch.softmax(probs.log() / 3, dim=1), labels), "temperature": 3}
    assert_png(plots.plot_reliability(before, after, tmp_path / "reliability.png"))
    assert_png(plots.plot_reliability(before, None, tmp_path / "before_only.png"))


def test_a_failed_plot_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "history.png"
    path.write_bytes(b"old")

    def broken_savefig(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_history([{"train_loss": 1.0}], path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.png"]


def test_plot_per_class_skips_missing_scores(tmp_path):
    per_class = {
        f"tag_{i}": {"ap": None if i == 0 else i / 10, "f1": i / 12, "support": i} for i in range(8)
    }
    assert_png(plots.plot_per_class(per_class, tmp_path / "per_class.png"))
