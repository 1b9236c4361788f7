import json

import numpy as np
import pytest
from sklearn import metrics as sk

from flax_detector import binary_metrics


def _scores(seed: int, n: int, positive_share: float, ties: bool) -> tuple[np.ndarray, np.ndarray]:
  """Informative but noisy scores; `ties` rounds them to 1/10 so many examples share a score."""
  rng = np.random.default_rng(seed)
  y = rng.random(n) < positive_share
  p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (y - 0.5))))
  return (np.round(p, 1) if ties else p), y


CASES = {
  "continuous": _scores(0, 500, 0.5, ties=False),
  "ties": _scores(1, 500, 0.5, ties=True),
  "imbalanced_ties": _scores(2, 400, 0.08, ties=True),
  "mostly_positive": _scores(3, 300, 0.9, ties=False),
  "perfect": (np.array([0.0, 0.1, 0.2, 0.8, 0.9, 1.0]), np.array([0, 0, 0, 1, 1, 1])),
  "all_tied": (np.full(10, 0.5), np.array([0, 1] * 5)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_summary_matches_sklearn(name, threshold):
  p, y = CASES[name]
  summary = binary_metrics.summarize(p, y, threshold)
  predicted = p >= threshold
  assert summary["accuracy"] == pytest.approx(sk.accuracy_score(y, predicted), abs=1e-12)
  assert summary["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, predicted), abs=1e-12)
  assert summary["precision"] == pytest.approx(sk.precision_score(y, predicted, zero_division=0), abs=1e-12)
  assert summary["recall"] == pytest.approx(sk.recall_score(y, predicted, zero_division=0), abs=1e-12)
  assert summary["f1"] == pytest.approx(sk.f1_score(y, predicted, zero_division=0), abs=1e-12)
  assert summary["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
  assert summary["average_precision"] == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
  assert summary["brier"] == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)
  assert summary["confusion_matrix"] == sk.confusion_matrix(y, predicted, labels=[False, True]).tolist()
  assert summary["num_examples"] == len(p)
  assert summary["threshold"] == threshold
  json.dumps(summary)  # plain Python types only


def test_perfect_classifier_scores_one():
  summary = binary_metrics.summarize(*CASES["perfect"], threshold=0.5)
  for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc", "average_precision"):
    assert summary[key] == 1.0, key


def test_ties_count_half_in_auc():
  # One positive tied with one negative, one positive above both: pairs (1, 0.5, ...) -> AUC = (1 + 0.5) / 2.
  assert binary_metrics.roc_auc(np.array([0.9, 0.4, 0.4]), np.array([1, 1, 0])) == pytest.approx(0.75)


@pytest.mark.parametrize("name", CASES)
def test_curves_match_sklearn(name):
  p, y = CASES[name]
  fpr, tpr, thresholds = binary_metrics.roc_curve(p, y)
  sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(y, p, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_array_equal(thresholds[1:], sk_thresholds[1:])
  precision, recall, pr_thresholds = binary_metrics.precision_recall_curve(p, y)
  sk_precision, sk_recall, sk_pr_thresholds = sk.precision_recall_curve(y, p)
  np.testing.assert_allclose(precision, sk_precision)
  np.testing.assert_allclose(recall, sk_recall)
  np.testing.assert_array_equal(pr_thresholds, sk_pr_thresholds)


def _loop_ece(p: np.ndarray, y: np.ndarray, num_bins: int) -> float:
  """The textbook definition, one example and one bin at a time."""
  total = 0.0
  for lo, hi in zip(np.linspace(0, 1, num_bins + 1)[:-1], np.linspace(0, 1, num_bins + 1)[1:]):
    confidences, hits = [], []
    for score, label in zip(p, y):
      confidence = score if score >= 0.5 else 1 - score
      if lo < confidence <= hi:
        confidences.append(confidence)
        hits.append(float((score >= 0.5) == label))
    if confidences:
      total += len(confidences) / len(p) * abs(np.mean(hits) - np.mean(confidences))
  return total


@pytest.mark.parametrize("name", ["continuous", "ties", "imbalanced_ties", "mostly_positive"])
def test_ece_matches_a_loop(name):
  p, y = CASES[name]
  assert binary_metrics.summarize(p, y, 0.5)["ece"] == pytest.approx(_loop_ece(p, y, 15), abs=1e-12)
  assert binary_metrics.expected_calibration_error(p, y, 7) == pytest.approx(_loop_ece(p, y, 7), abs=1e-12)


def test_ece_of_a_calibrated_and_an_overconfident_model():
  rng = np.random.default_rng(4)
  p = rng.random(200_000)
  calibrated = rng.random(p.size) < p
  assert binary_metrics.expected_calibration_error(p, calibrated) < 0.01
  # Always 99% sure but right only 75% of the time: ECE = 0.99 - 0.75.
  p = np.full(1000, 0.99)
  y = np.arange(1000) % 4 != 0
  assert binary_metrics.expected_calibration_error(p, y) == pytest.approx(0.24)


def test_reliability_bins_count_every_example_once():
  p, y = CASES["ties"]
  bins = binary_metrics.reliability_bins(p, y)
  assert bins.count.sum() == len(p) and len(bins.count) == 15 and len(bins.edges) == 16
  assert np.all(bins.count[:7] == 0) and np.all(np.isnan(bins.accuracy[:7]))  # confidence >= 0.5
  filled = bins.count > 0
  lower, upper = bins.edges[:-1][filled], bins.edges[1:][filled]
  assert np.all((bins.confidence[filled] > lower) & (bins.confidence[filled] <= upper + 1e-12))  # a mean of 0.6s


def test_single_class_gives_null_ranking_metrics():
  p = np.array([0.2, 0.7, 0.9])
  summary = binary_metrics.summarize(p, np.ones(3, bool), 0.5)
  assert summary["roc_auc"] is None and summary["average_precision"] is None
  assert summary["recall"] == pytest.approx(2 / 3) and summary["balanced_accuracy"] == pytest.approx(2 / 3)
  assert json.loads(json.dumps(summary))["roc_auc"] is None
  assert binary_metrics.summarize(p, np.zeros(3, bool), 0.5)["precision"] == 0.0
  with pytest.raises(ValueError, match="both classes"):
    binary_metrics.roc_curve(p, np.zeros(3, bool))


@pytest.mark.parametrize(
  "p, y",
  [
    (np.array([0.5, 1.2]), np.array([0, 1])),
    (np.array([0.5]), np.array([0, 1])),
    (np.array([0.5, 0.2]), np.array([0, 2])),
    (np.array([]), np.array([])),
  ],
)
def test_bad_inputs_are_rejected(p, y):
  with pytest.raises(ValueError):
    binary_metrics.summarize(p, y, 0.5)
