import numpy as np
import pytest

from flax_detector import calibration


def _overconfident(seed: int, n: int, num_classes: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Labels drawn from softmax(z) (calibrated at T = 1), returned with log_softmax(scale * z)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=1.5, size=(n, num_classes))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  labels = (rng.random((n, 1)) > np.cumsum(probs, 1)).sum(1)
  scaled = scale * logits
  return scaled - np.log(np.exp(scaled).sum(1, keepdims=True)), labels


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_temperature_is_recovered(num_classes, scale):
  log_probs, labels = _overconfident(0, 20_000, num_classes, scale)
  temperature = calibration.fit_temperature(log_probs, labels)
  assert temperature == pytest.approx(scale, rel=0.05)
  assert calibration.fit_temperature(log_probs, labels) == temperature  # deterministic


def test_fitted_temperature_lowers_nll_and_keeps_the_ranking():
  log_probs, labels = _overconfident(1, 2000, 2, 3.0)
  temperature = calibration.fit_temperature(log_probs, labels)
  before = calibration.negative_log_likelihood(log_probs, labels)
  after = calibration.negative_log_likelihood(log_probs, labels, temperature)
  assert after < before
  for nearby in (temperature * 0.9, temperature * 1.1):
    assert after <= calibration.negative_log_likelihood(log_probs, labels, nearby)
  probs = calibration.apply_temperature(log_probs, temperature)
  np.testing.assert_allclose(probs.sum(1), 1.0)
  np.testing.assert_array_equal(probs.argmax(1), log_probs.argmax(1))


def test_temperature_for_unnormalised_view_averaged_log_probs():
  # An average of log-softmaxes is not normalised; scaling must renormalise, so a constant shift is irrelevant.
  log_probs, labels = _overconfident(2, 5000, 2, 2.0)
  assert calibration.fit_temperature(log_probs - 0.7, labels) == pytest.approx(
    calibration.fit_temperature(log_probs, labels), rel=1e-5
  )
  np.testing.assert_allclose(
    calibration.apply_temperature(log_probs - 0.7, 2.0), calibration.apply_temperature(log_probs, 2.0)
  )


def test_temperature_stays_within_its_bounds():
  log_probs = np.log(np.array([[0.9, 0.1], [0.1, 0.9]] * 10))
  assert calibration.fit_temperature(log_probs, np.array([0, 1] * 10)) == pytest.approx(
    calibration.MIN_TEMPERATURE, rel=1e-3
  )
  assert calibration.fit_temperature(log_probs, np.array([1, 0] * 10)) == pytest.approx(
    calibration.MAX_TEMPERATURE, rel=1e-3
  )


def test_apply_temperature_matches_a_hand_computation():
  log_probs = np.log(np.array([[0.8, 0.2]]))
  expected = np.array([0.8**0.5, 0.2**0.5]) / (0.8**0.5 + 0.2**0.5)
  np.testing.assert_allclose(calibration.apply_temperature(log_probs, 2.0)[0], expected)
  with pytest.raises(ValueError, match="positive"):
    calibration.apply_temperature(log_probs, 0.0)


def _brute_force_balanced_accuracy(p: np.ndarray, y: np.ndarray, threshold: float) -> float:
  predicted = p >= threshold
  return (np.mean(predicted[y]) + np.mean(~predicted[~y])) / 2


def test_threshold_on_shifted_imbalanced_scores():
  # Negatives around 0.2, ten times fewer positives around 0.4, equal spread: the balanced optimum is near 0.3,
  # where plain accuracy would prefer a higher threshold that sacrifices the minority class.
  rng = np.random.default_rng(3)
  p = np.clip(np.r_[rng.normal(0.2, 0.05, 20_000), rng.normal(0.4, 0.05, 2_000)], 0, 1)
  y = np.r_[np.zeros(20_000, bool), np.ones(2_000, bool)]
  threshold = calibration.choose_threshold(p, y)
  assert threshold == pytest.approx(0.3, abs=0.01)
  grid = np.linspace(0, 1, 2001)
  best_on_grid = max(_brute_force_balanced_accuracy(p, y, t) for t in grid)
  assert _brute_force_balanced_accuracy(p, y, threshold) >= best_on_grid


def test_threshold_separates_separable_scores_with_a_margin():
  p = np.array([0.05, 0.1, 0.2, 0.3, 0.35])
  y = np.array([0, 0, 0, 1, 1], bool)
  assert calibration.choose_threshold(p, y) == pytest.approx(0.25)
  assert calibration.choose_threshold(1 - p, ~y) == pytest.approx(0.75)


def test_threshold_ties_keep_one_half():
  p = np.array([0.1, 0.2, 0.7, 0.9])
  assert calibration.choose_threshold(p, np.array([0, 0, 1, 1], bool)) == 0.5
  assert calibration.choose_threshold(p, np.ones(4, bool)) == 0.5
  assert calibration.choose_threshold(np.full(4, 0.8), np.array([0, 1, 0, 1], bool)) == 0.5  # no information


def test_a_perfectly_separated_validation_split_leaves_the_temperature_at_one():
  from flax_detector import report  # pylint: disable=g-import-not-at-top

  labels = np.array([0, 1] * 20)
  log_probs = np.log(np.where(np.eye(2)[labels] == 1, 0.9, 0.1))  # every example right, none certain
  fitted = report.fit_calibration(log_probs, labels, positive=1)
  assert fitted["temperature"] == 1.0 and "perfectly separated" in fitted["temperature_note"]
  assert fitted["ece_after"] == fitted["ece_before"]
