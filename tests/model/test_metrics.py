"""Metrics and calibration against hand-computed values and synthetic data with known answers."""

from __future__ import annotations

import json

import pytest
import torch

from model.metrics import (
    TEMPERATURE_RANGE,
    average_precision,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    multilabel_metrics,
    reliability_bins,
    tune_thresholds,
)


def one_hot_probs(predicted: list[int], num_classes: int, confidence: float = 0.8) -> torch.Tensor:
    probs = torch.full((len(predicted), num_classes), (1 - confidence) / (num_classes - 1))
    probs[torch.arange(len(predicted)), torch.tensor(predicted)] = confidence
    return probs


def calibrated_sample(n: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 confidence p ~ U(1/C, 1), and the top class is the label with probability p."""
    g = torch.Generator().manual_seed(seed)
    top = torch.empty(n, dtype=torch.float64).uniform_(1 / num_classes, 1, generator=g)
    probs = ((1 - top) / (num_classes - 1))[:, None].repeat(1, num_classes)
    probs[:, 0] = top
    correct = torch.rand(n, generator=g, dtype=torch.float64) < top
    wrong = torch.randint(1, num_classes, (n,), generator=g)
    return probs, torch.where(correct, 0, wrong)


def scaled_logits(temperature: float, n: int = 4000, seed: int = 0):
    """Labels drawn from softmax(z); the model reports z * temperature (so T should undo it)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    return z * temperature, labels


# ---------------------------------------------------------------- temperature


@pytest.mark.parametrize("true_temperature", [2.5, 0.5])
def test_fit_temperature_recovers_a_known_temperature(true_temperature):
    logits, labels = scaled_logits(true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.08)


def test_fit_temperature_is_about_one_on_a_calibrated_model():
    logits, labels = scaled_logits(1.0)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)


def test_fit_temperature_falls_back_to_one_when_nothing_improves():
    assert fit_temperature(torch.zeros(10, 3), torch.randint(0, 3, (10,))) == 1.0
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_fit_temperature_stays_in_range_on_nearly_separable_data():
    labels = torch.arange(30) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 50
    logits[0] = torch.tensor([0.0, 1.0, 0.0])  # one mistake
    temperature = fit_temperature(logits, labels)
    assert TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]


def test_fit_temperature_keeps_one_when_every_prediction_is_right():
    """No mistake to learn from: the NLL would fall without end as T -> 0 and make every
    served probability near 1. An all-correct validation set leaves the model as it is."""
    labels = torch.arange(30) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 2 + 0.1 * torch.randn(30, 3)
    assert fit_temperature(logits, labels) == 1.0


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    logits, labels = scaled_logits(3.0)
    before = expected_calibration_error(torch.softmax(logits, 1), labels)
    after = expected_calibration_error(
        torch.softmax(logits / fit_temperature(logits, labels), 1), labels
    )
    assert after < before / 3


# ---------------------------------------------------------------- ECE and reliability bins


def test_ece_of_perfectly_calibrated_data_is_about_zero():
    probs, labels = calibrated_sample(40_000, num_classes=4)
    assert expected_calibration_error(probs, labels) < 0.015


def test_ece_of_an_overconfident_model_is_the_gap():
    # always 90% sure, right 6 times in 10
    probs = one_hot_probs([0] * 10, 3, confidence=0.9)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    result = reliability_bins(probs, labels, bins=2)
    low, high = result["bins"]
    assert low["count"] == 0 and low["confidence"] is None and low["accuracy"] is None
    assert high["count"] == 4
    assert high["confidence"] == pytest.approx(0.75)
    assert high["accuracy"] == pytest.approx(0.75)
    assert (high["lower"], high["upper"]) == (0.5, 1.0)
    assert result["ece"] == pytest.approx(0.0)
    json.dumps(result)


def test_reliability_bins_put_exact_edges_in_the_lower_bin():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    bins = reliability_bins(probs, torch.tensor([0, 0]), bins=2)["bins"]
    assert [b["count"] for b in bins] == [1, 1]


# ---------------------------------------------------------------- single-label metrics


def test_classification_metrics_by_hand():
    classes = ["cat", "dog", "fox"]
    labels = torch.tensor([0, 0, 1, 2])
    probs = one_hot_probs([0, 1, 1, 1], 3)
    m = classification_metrics(probs, labels, classes)
    assert m["accuracy"] == 0.5
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert m["per_class"]["cat"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1}
    )
    assert m["per_class"]["dog"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["dog"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["fox"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert m["top5_k"] == 3 and m["top5"] == 1.0
    assert m["nll"] == pytest.approx(
        -(2 * torch.tensor(0.8).log() + 2 * torch.tensor(0.1).log()) / 4
    )
    json.dumps(m)


def test_top5_counts_the_label_among_the_five_most_probable():
    probs = torch.tensor([[0.30, 0.20, 0.15, 0.12, 0.11, 0.07, 0.05]] * 2)
    m = classification_metrics(probs, torch.tensor([4, 5]), [str(i) for i in range(7)])
    assert m["top5_k"] == 5 and m["top5"] == 0.5 and m["accuracy"] == 0.0


def test_macro_f1_ignores_a_class_that_is_neither_present_nor_predicted():
    m = classification_metrics(one_hot_probs([0, 1], 3), torch.tensor([0, 1]), ["a", "b", "c"])
    assert m["macro_f1"] == 1.0


# ---------------------------------------------------------------- multi-label


def test_average_precision_on_a_known_ranking():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positives = torch.tensor([1, 0, 1, 0, 1])
    assert average_precision(scores, positives) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_average_precision_counts_tied_scores_as_one_threshold():
    scores = torch.tensor([0.9, 0.5, 0.5])
    assert average_precision(scores, torch.tensor([1, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores, torch.tensor([0, 0, 0])) is None


def test_multilabel_metrics_by_hand():
    classes = ["sky", "sea", "snow"]
    probs = torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.7, 0.2], [0.3, 0.8, 0.4], [0.1, 0.4, 0.3]])
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]])
    m = multilabel_metrics(probs, targets, classes)
    assert m["ap_skipped"] == ["snow"]
    assert m["per_class"]["snow"]["ap"] is None
    assert m["per_class"]["sky"]["ap"] == 1.0
    assert m["per_class"]["sea"]["ap"] == 1.0  # 0.8, 0.7, 0.4 are the positives, 0.2 is not
    assert m["mAP"] == 1.0
    # at 0.5: sky 2/2 right, sea finds 2 of 3 positives, snow never predicted
    assert m["per_class"]["sea"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["sea"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((1 + 0.8) / 2)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (4 + 5))
    assert m["exact_match"] == 0.75
    json.dumps(m)


def test_multilabel_metrics_uses_the_given_thresholds():
    probs = torch.tensor([[0.3], [0.2], [0.1]])
    targets = torch.tensor([[1], [1], [0]])
    assert multilabel_metrics(probs, targets, ["x"])["per_class"]["x"]["recall"] == 0.0
    tuned = multilabel_metrics(probs, targets, ["x"], thresholds=[0.15])["per_class"]["x"]
    assert tuned["recall"] == 1.0 and tuned["precision"] == 1.0 and tuned["threshold"] == 0.15
    with pytest.raises(ValueError, match="thresholds"):
        multilabel_metrics(probs, targets, ["x"], thresholds=[0.5, 0.5])


def test_tune_thresholds_maximises_f1():
    probs = torch.tensor([[0.3], [0.2], [0.1], [0.05]])
    targets = torch.tensor([[1], [1], [0], [0]])
    (threshold,) = tune_thresholds(probs, targets)
    assert threshold == pytest.approx(0.15)  # midway between the last positive and first negative
    m = multilabel_metrics(probs, targets, ["x"], thresholds=[threshold])
    assert m["per_class"]["x"]["f1"] == 1.0


def test_tune_thresholds_prefers_half_on_ties_and_defaults_without_positives():
    probs = torch.tensor([[0.9, 0.7], [0.1, 0.6], [0.8, 0.2]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]])
    assert tune_thresholds(probs, targets) == [0.5, 0.5]  # any t in (0.1, 0.8] is perfect for 0


def test_tune_thresholds_beats_a_fixed_half_on_shifted_scores():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(500, 4, generator=g) < 0.3).int()
    probs = (0.15 + 0.3 * targets + 0.1 * torch.randn(500, 4, generator=g)).clamp(0, 1)
    tuned = tune_thresholds(probs, targets)
    assert all(0.1 < t < 0.45 for t in tuned)
    at_half = multilabel_metrics(probs, targets, list("abcd"))["macro_f1"]
    assert multilabel_metrics(probs, targets, list("abcd"), tuned)["macro_f1"] > at_half + 0.2
