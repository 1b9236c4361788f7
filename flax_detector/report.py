"""From a detector's scores to the numbers and figures a person can trust: calibration, metrics, plots.

Shared by training (which fits the calibration on the validation split and sends the test split's
figures to TensorBoard) and by `flax_detector.evaluate` (which adds robustness and mistakes to a full
report). Everything here works on host arrays of view-averaged log-probabilities.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from flax_detector import binary_metrics, calibration, report_figures
from flax_detector import workdir as workdir_layout

# The figures drawn from scores alone; evaluate adds robustness.png and mistakes.png.
SCORE_FIGURES = ("confusion_matrix.png", "roc.png", "pr.png", "score_histogram.png", "reliability.png")


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Softmax temperature and decision threshold on the calibrated p(positive), fitted on validation."""

  temperature: float = 1.0
  threshold: float = 0.5

  def probabilities(self, log_probs: np.ndarray) -> np.ndarray:
    return calibration.apply_temperature(log_probs, self.temperature)


def fit_calibration(log_probs: np.ndarray, labels: np.ndarray, positive: int) -> dict[str, Any]:
  """Fits the temperature, then the threshold on the calibrated scores; JSON-ready, with ECE before and after.

  The threshold is chosen here, on validation, and never on test: a cut-off tuned on the test split
  would make the test accuracy a training number.
  """
  temperature = calibration.fit_temperature(log_probs, labels)
  note = "fitted by minimising the validation NLL"
  if temperature <= calibration.MIN_TEMPERATURE * 1.01:
    # The NLL falls all the way to T -> 0 only when validation has no errors to weigh: sharpening then
    # would call every future score certain on no evidence, so the scores are left as the model gives them.
    temperature = 1.0
    note = "left at 1: validation is perfectly separated, so it gives no evidence for sharper scores"
  is_positive = np.asarray(labels) == positive
  before = calibration.apply_temperature(log_probs, 1.0)[:, positive]
  after = calibration.apply_temperature(log_probs, temperature)[:, positive]
  return {
    "temperature": temperature,
    "threshold": calibration.choose_threshold(after, is_positive),
    "fitted_on": "validation",
    "temperature_note": note,
    "num_examples": int(len(labels)),
    "ece_before": binary_metrics.expected_calibration_error(before, is_positive),
    "ece_after": binary_metrics.expected_calibration_error(after, is_positive),
    "nll_before": calibration.negative_log_likelihood(log_probs, labels, 1.0),
    "nll_after": calibration.negative_log_likelihood(log_probs, labels, temperature),
  }


def load_calibration(workdir: epath.PathLike) -> Calibration:
  """The run's fitted calibration; temperature 1 and threshold 0.5 for runs that have none."""
  path = epath.Path(workdir) / workdir_layout.CALIBRATION
  if not path.exists():
    return Calibration()
  fitted = workdir_layout.read_json(path)
  return Calibration(temperature=float(fitted["temperature"]), threshold=float(fitted["threshold"]))


def summarize_scores(log_probs: np.ndarray, labels: np.ndarray, positive: int, fitted: Calibration) -> dict[str, Any]:
  """binary_metrics.summarize on the calibrated scores at the fitted threshold, plus ECE before calibration."""
  is_positive = np.asarray(labels) == positive
  summary = binary_metrics.summarize(fitted.probabilities(log_probs)[:, positive], is_positive, fitted.threshold)
  summary["ece_calibrated"] = summary["ece"]
  summary["ece"] = binary_metrics.expected_calibration_error(np.exp(log_probs[:, positive]), is_positive)
  summary["temperature"] = fitted.temperature
  return summary


def write_score_figures(
  directory: epath.Path,
  log_probs: np.ndarray,
  labels: np.ndarray,
  positive: int,
  class_names: Sequence[str],
  fitted: Calibration,
  summary: dict[str, Any],
) -> list[str]:
  """Writes SCORE_FIGURES into `directory` and returns their names.

  The confusion matrix is drawn in (negative, positive) order, as summarize counts it.
  """
  directory.mkdir(parents=True, exist_ok=True)
  is_positive = np.asarray(labels) == positive
  raw = np.exp(log_probs[:, positive])
  calibrated = fitted.probabilities(log_probs)[:, positive]
  negative_name = next(name for index, name in enumerate(class_names) if index != positive)
  ordered_names = [negative_name, class_names[positive]]
  report_figures.confusion_matrix_figure(summary["confusion_matrix"], ordered_names, directory / SCORE_FIGURES[0])
  report_figures.roc_figure(calibrated, is_positive, directory / SCORE_FIGURES[1], summary["roc_auc"])
  report_figures.pr_figure(calibrated, is_positive, directory / SCORE_FIGURES[2], summary["average_precision"])
  report_figures.score_histogram_figure(
    calibrated, is_positive, ordered_names, fitted.threshold, directory / SCORE_FIGURES[3]
  )
  report_figures.reliability_figure(
    binary_metrics.reliability_bins(raw, is_positive),
    None if fitted.temperature == 1.0 else binary_metrics.reliability_bins(calibrated, is_positive),
    directory / SCORE_FIGURES[4],
    summary["ece"],
    None if fitted.temperature == 1.0 else summary["ece_calibrated"],
  )
  return list(SCORE_FIGURES)
