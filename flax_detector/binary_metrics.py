"""Exact binary metrics of a detector's scores, in numpy only, for the evaluation report.

`p` is the probability of the positive class ("ai-generated") and `y` whether the true class is positive.
The training metrics (metrics.py) are streamed, per-batch approximations; the report needs numbers that
match a reference implementation exactly, so ROC AUC and average precision follow scikit-learn's
definitions (ties handled on distinct thresholds, average precision without interpolation) and the
tests compare against it. scikit-learn itself is only a test dependency.
"""

from typing import Any, NamedTuple

import numpy as np

NUM_ECE_BINS = 15


class ReliabilityBins(NamedTuple):
  """Per-bin calibration statistics; `confidence` and `accuracy` are NaN in empty bins."""

  edges: np.ndarray  # float64[num_bins + 1], bin i is (edges[i], edges[i + 1]] (the first also holds 0)
  confidence: np.ndarray  # float64[num_bins], mean confidence of the predicted class
  accuracy: np.ndarray  # float64[num_bins], fraction of the bin's predictions that are right
  count: np.ndarray  # int64[num_bins]


def _check(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 scores in [0, 1] and bool labels of one length; fails loudly rather than scoring garbage."""
  p = np.asarray(p, np.float64)
  y = np.asarray(y)
  if p.ndim != 1 or y.shape != p.shape:
    raise ValueError(f"need 1-D scores and labels of one length, got shapes {p.shape} and {y.shape}")
  if p.size == 0:
    raise ValueError("no examples to score")
  if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
    raise ValueError("scores must be probabilities in [0, 1]")
  if not np.all((y == 0) | (y == 1)):
    raise ValueError("labels must be 0/1 or bool")
  return p, y.astype(bool)


def _counts_at_distinct_thresholds(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false positives, true positives, threshold) for "positive if p >= t" at each distinct score, descending.

  Tied scores are one threshold, which is what makes AUC and AP count ties the way scikit-learn does.
  """
  order = np.argsort(-p, kind="mergesort")
  p_sorted, y_sorted = p[order], y[order]
  last_of_each_value = np.r_[np.flatnonzero(np.diff(p_sorted)), p.size - 1]
  tps = np.cumsum(y_sorted)[last_of_each_value]
  fps = (last_of_each_value + 1) - tps
  return fps.astype(np.float64), tps.astype(np.float64), p_sorted[last_of_each_value]


def _has_both_classes(y: np.ndarray) -> bool:
  return bool(y.any() and not y.all())


def roc_curve(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false positive rate, true positive rate, thresholds), from (0, 0) at threshold +inf, as sklearn's.

  Raises ValueError when only one class is present: one of the two rates is then undefined.
  """
  p, y = _check(p, y)
  if not _has_both_classes(y):
    raise ValueError("a ROC curve needs both classes")
  fps, tps, thresholds = _counts_at_distinct_thresholds(p, y)
  return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thresholds]


def precision_recall_curve(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(precision, recall, thresholds) with recall decreasing and a final (1, 0) point, as sklearn's.

  Raises ValueError without positives, where recall is undefined.
  """
  p, y = _check(p, y)
  if not y.any():
    raise ValueError("a precision-recall curve needs positive examples")
  fps, tps, thresholds = _counts_at_distinct_thresholds(p, y)
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def roc_auc(p: np.ndarray, y: np.ndarray) -> float | None:
  """Area under the ROC curve by trapezoids (a tie counts half); None when only one class is present."""
  p, y = _check(p, y)
  if not _has_both_classes(y):
    return None
  fpr, tpr, _ = roc_curve(p, y)
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(p: np.ndarray, y: np.ndarray) -> float | None:
  """Sum over thresholds of precision times the recall gained (no interpolation); None unless both classes."""
  p, y = _check(p, y)
  if not _has_both_classes(y):
    return None
  precision, recall, _ = precision_recall_curve(p, y)
  return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def reliability_bins(p: np.ndarray, y: np.ndarray, num_bins: int = NUM_ECE_BINS) -> ReliabilityBins:
  """Top-label calibration: confidence = probability of the class predicted at 0.5, i.e. max(p, 1 - p).

  That is the usual binary ECE definition (Guo et al., 2017, with two classes): it asks whether the
  model's stated certainty matches how often it is right, independently of the decision threshold the
  report applies. Bins are equal-width, right-closed (edges[i], edges[i + 1]] over [0, 1]; with two
  classes the confidence is at least 0.5, so the lower half stays empty.
  """
  p, y = _check(p, y)
  predicted_positive = p >= 0.5
  confidence = np.where(predicted_positive, p, 1 - p)
  correct = predicted_positive == y
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
  count = np.bincount(index, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.bincount(index, confidence, num_bins) / count
    accuracy = np.bincount(index, correct.astype(np.float64), num_bins) / count
  return ReliabilityBins(edges, mean_confidence, accuracy, count.astype(np.int64))


def expected_calibration_error(p: np.ndarray, y: np.ndarray, num_bins: int = NUM_ECE_BINS) -> float:
  """Sum over bins of (bin count / n) * |accuracy - mean confidence|, on `reliability_bins`."""
  bins = reliability_bins(p, y, num_bins)
  filled = bins.count > 0
  gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
  return float(np.sum(bins.count[filled] * gaps) / np.sum(bins.count))


def _ratio(numerator: float, denominator: float) -> float:
  """numerator / denominator, 0 when the denominator is 0: sklearn's zero_division default."""
  return float(numerator / denominator) if denominator else 0.0


def summarize(p: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
  """The report's headline numbers, JSON-ready (plain floats, ints, lists and None).

  Predicted positive is p >= threshold. Balanced accuracy averages the recall of the classes present,
  so a detector that calls everything "ai-generated" scores 0.5 on an imbalanced folder, not the
  positive share.
  """
  p, y = _check(p, y)
  predicted = p >= threshold
  tp = int(np.sum(predicted & y))
  fp = int(np.sum(predicted & ~y))
  fn = int(np.sum(~predicted & y))
  tn = int(np.sum(~predicted & ~y))
  precision = _ratio(tp, tp + fp)
  recall = _ratio(tp, tp + fn)
  class_recalls = [tn / (tn + fp)] if tn + fp else []
  class_recalls += [tp / (tp + fn)] if tp + fn else []
  return {
    "accuracy": (tp + tn) / p.size,
    "balanced_accuracy": float(np.mean(class_recalls)),
    "precision": precision,
    "recall": recall,
    "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    "roc_auc": roc_auc(p, y),
    "average_precision": average_precision(p, y),
    "ece": expected_calibration_error(p, y),
    "brier": float(np.mean((p - y) ** 2)),
    "threshold": float(threshold),
    "confusion_matrix": [[tn, fp], [fn, tp]],
    "num_examples": int(p.size),
  }
