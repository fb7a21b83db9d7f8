"""model.evaluate: the reusable pieces, and the CLI end to end on tiny photo sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from model import evaluate
from model.checkpoint import load
from model.tta import TTA
from tests.helpers import (
    COLORS,
    TINY_CLASSES,
    load_tagger,
    photo_bytes,
    write_photo_folder,
    write_tiny_checkpoint,
)


def write_photos(folder: Path, classes=TINY_CLASSES, per_class: int = 3, seed: int = 0) -> Path:
    colors = {name: COLORS.get(name, (120, 120, 120)) for name in classes}
    return write_photo_folder(folder, per_class, colors, size=(64, 48), seed=seed)


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in args] + ["--workers", "0"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- predict and friends


class Asymmetric(nn.Module):
    """Logits that change when the photo is mirrored: (B, 3, H, W) -> (B, 2)."""

    def forward(self, x):
        left, right = x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x.mean((1, 2, 3))
        return torch.stack([left, right], dim=1)


def test_predict_divides_by_the_temperature_and_averages_flips():
    images = torch.randn(5, 3, 4, 4)
    loader = [(images[:3], torch.tensor([0, 1, 0])), (images[3:], torch.tensor([1, 1]))]
    model = Asymmetric()
    logits, targets = evaluate.predict(model, loader, "cpu", temperature=2.0)
    assert torch.allclose(logits, model(images) / 2)
    assert targets.tolist() == [0, 1, 0, 1, 1]
    flipped, _ = evaluate.predict(model, loader, "cpu", tta=TTA(flip=True))
    assert torch.allclose(flipped, (model(images) + model(images.flip(-1))) / 2)


def test_predict_refuses_an_empty_loader():
    with pytest.raises(evaluate.EvaluationError, match="no photos"):
        evaluate.predict(Asymmetric(), [], "cpu")


def test_evaluate_predictions_reports_calibration_before_and_after():
    logits = torch.randn(300, 3) * 4
    labels = torch.randint(0, 3, (300,))
    result = evaluate.evaluate_predictions(logits, labels, ["a", "b", "c"], temperature=4.0)
    calibration = result["calibration"]
    assert result["task"] == "single_label" and result["temperature"] == 4.0
    assert calibration["ece_after"] < calibration["ece_before"]  # random labels: T=4 helps
    assert result["ece"] == pytest.approx(calibration["ece_after"])
    json.dumps(result)


def test_evaluate_predictions_multilabel_uses_sigmoid_and_thresholds():
    logits = torch.tensor([[2.0, -2.0], [-2.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = evaluate.evaluate_predictions(
        logits, targets, ["x", "y"], task="multi_label", thresholds=[0.5, 0.7]
    )
    assert result["mAP"] == 1.0
    assert result["per_class"]["y"]["recall"] == 0.0  # sigmoid(0.5) = 0.62 < 0.7
    assert result["thresholds_source"] == "checkpoint"
    assert "calibration" not in result


def test_class_mapping_matches_by_name_and_lists_unknown_classes(tmp_path):
    card = evaluate.load(write_tiny_checkpoint(tmp_path / "c.safetensors")).card
    assert evaluate.class_mapping(["blue", "red"], card) == [2, 0]
    with pytest.raises(evaluate.EvaluationError, match="purple, teal"):
        evaluate.class_mapping(["red", "purple", "teal"], card)


# ---------------------------------------------------------------- the CLI


def test_cli_on_a_class_folder_evaluates_every_photo(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos")
    (photos / "red" / "broken.jpg").write_bytes(b"not a photo")
    whole = photo_bytes(size=(200, 150))
    (photos / "green" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors", temperature=1.5)
    code, out, _ = run_cli(
        capsys, "--checkpoint", checkpoint, "--data", photos, "--out", tmp_path / "e"
    )
    assert code == 0
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["source"]["split"] == "all" and result["num_samples"] == 9
    skipped = dict(result["source"]["skipped"])
    assert len(skipped) == 2 and "truncated" in skipped[str(photos / "green" / "truncated.jpg")]
    assert "not a readable image" in skipped[str(photos / "red" / "broken.jpg")]
    assert sum(map(sum, result["confusion_matrix"])) == 9
    assert set(result["per_class"]) == set(TINY_CLASSES)
    assert result["calibration"]["temperature"] == 1.5
    assert {"accuracy", "top5", "macro_f1", "ece", "nll"} <= set(result)
    assert (tmp_path / "e" / "confusion.png").stat().st_size > 0
    assert (tmp_path / "e" / "reliability.png").stat().st_size > 0
    assert "accuracy" in out and "2 unreadable skipped" in out and "evaluation.json" in out


def test_cli_probabilities_are_the_servers(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", per_class=1)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors", temperature=0.7)
    tagger = load_tagger(checkpoint)
    paths = sorted(photos.rglob("*.jpg"))
    served = tagger.probabilities(
        torch.stack([tagger.pixels(p.read_bytes(), reducing_gap=0) for p in paths])
    )
    spec = evaluate.data.load_dataset(photos, val_fraction=0.0)
    loader = evaluate.data.make_eval_loader(
        spec.train, TINY_CLASSES, "single_label", tagger.card.preprocess
    )
    network = load(checkpoint).build_model()
    logits, _ = evaluate.predict(network, loader, "cpu", temperature=0.7)
    order = [paths.index(s.path) for s in spec.train]
    assert torch.allclose(torch.softmax(logits, 1), served[order], atol=1e-6)


def test_cli_defaults_to_the_test_split_and_writes_beside_the_checkpoint(tmp_path, capsys):
    write_photos(tmp_path / "photos" / "train")
    write_photos(tmp_path / "photos" / "val", per_class=1)
    write_photos(tmp_path / "photos" / "test", per_class=2, seed=50)
    checkpoint = write_tiny_checkpoint(tmp_path / "run" / "best.safetensors")
    code, _, _ = run_cli(
        capsys, "--checkpoint", checkpoint, "--data", tmp_path / "photos", "--tta-flip"
    )
    assert code == 0
    result = json.loads((tmp_path / "run" / "eval-photos-test" / "evaluation.json").read_text())
    assert result["source"]["split"] == "test" and result["num_samples"] == 6
    assert result["source"]["tta_flip"] is True


def test_cli_val_split_of_an_unsplit_folder_redraws_the_training_split(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", per_class=5)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    args = ["--checkpoint", checkpoint, "--data", photos, "--split", "val", "--val-fraction", "0.4"]
    code, _, _ = run_cli(capsys, *args, "--out", tmp_path / "e")
    assert code == 0
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["num_samples"] == 6
    code, _, err = run_cli(capsys, "--checkpoint", checkpoint, "--data", photos, "--split", "test")
    assert code == 2 and "no 'test' split" in err


def test_cli_refuses_classes_the_checkpoint_does_not_know(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", classes=["red", "purple"])
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, _, err = run_cli(capsys, "--checkpoint", checkpoint, "--data", photos)
    assert code == 2
    assert "purple" in err and "red, green, blue" in err


def test_cli_reports_a_missing_checkpoint_clearly(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", per_class=1)
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "nope.safetensors", "--data", photos)
    assert code == 2 and "checkpoint not found" in err


def test_cli_reports_a_device_that_cannot_work_clearly(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", per_class=1)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    args = ["--checkpoint", checkpoint, "--data", photos, "--device", "tpu"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "use auto, cpu, cuda or cuda:N" in err


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, _) in enumerate(rows):
        (folder / name).write_bytes(photo_bytes(seed=i))
    manifest = folder / "tags.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "tags"])
        writer.writerows(rows)
    return manifest


def test_cli_on_a_multilabel_manifest_uses_the_checkpoints_thresholds(tmp_path, capsys):
    rows = [("a.jpg", "red;green"), ("b.jpg", "green"), ("c.jpg", "red"), ("d.jpg", "green;red")]
    manifest = write_manifest(tmp_path / "photos", rows)
    checkpoint = write_tiny_checkpoint(
        tmp_path / "ml.safetensors", task="multi_label", thresholds=[0.3, 0.5, 0.7]
    )
    code, out, _ = run_cli(
        capsys, "--checkpoint", checkpoint, "--data", manifest, "--out", tmp_path / "e"
    )
    assert code == 0
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["task"] == "multi_label" and result["num_samples"] == 4
    assert result["ap_skipped"] == ["blue"]
    assert [result["per_class"][c]["threshold"] for c in TINY_CLASSES] == [0.3, 0.5, 0.7]
    assert result["per_class"]["green"]["support"] == 3
    assert 0 <= result["mAP"] <= 1 and "micro_f1" in result
    assert "mAP" in out and "thresholds: checkpoint" in out
    assert (tmp_path / "e" / "per_class.png").stat().st_size > 0


def test_cli_refuses_a_multilabel_manifest_for_a_single_label_checkpoint(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "photos", [("a.jpg", "red;green"), ("b.jpg", "blue")])
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code, _, err = run_cli(capsys, "--checkpoint", checkpoint, "--data", manifest)
    assert code == 2 and "multi-label" in err


def test_confusion_plot_of_a_big_model_keeps_the_classes_that_occur():
    classes = [f"c{i}" for i in range(200)]
    matrix = torch.zeros(200, 200, dtype=torch.long)
    matrix[3, 3], matrix[3, 150], matrix[7, 7] = 5, 2, 4
    result = {"confusion_matrix": matrix.tolist(), "per_class": {c: {} for c in classes}}
    small, kept = evaluate.confusion_for_plot(result)
    assert kept == ["c3", "c7", "c150"]
    assert small == [[5, 0, 2], [0, 4, 0], [0, 0, 0]]
