"""Post-hoc calibration fitted on the validation split: a softmax temperature and a decision threshold.

A network trained with cross-entropy is usually over-confident; one temperature rescales its
confidence without changing which class it ranks first (Guo et al., 2017), so accuracy and ROC AUC are
untouched while ECE and NLL drop. The threshold is the operating point: 0.5 on p_ai is only right when
classes are balanced and the model calibrated, and real folders are neither.
"""

import math

import numpy as np

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
_GOLDEN = (math.sqrt(5) - 1) / 2
_LOG_TOLERANCE = 1e-7  # in log T: T is found to a relative 1e-7, far below what the NLL can resolve


def _check_log_probs(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels)
  if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1] or log_probs.shape[0] == 0:
    raise ValueError(f"need log_probs [n, C] and labels [n] with n > 0, got {log_probs.shape} and {labels.shape}")
  if not np.all(np.isfinite(log_probs)):
    raise ValueError("log_probs must be finite")
  if labels.min() < 0 or labels.max() >= log_probs.shape[1]:
    raise ValueError(f"labels must be in [0, {log_probs.shape[1]})")
  return log_probs, labels.astype(np.int64)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
  shifted = scores - scores.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  scaled = _log_softmax(log_probs / temperature)
  return float(-np.mean(scaled[np.arange(len(labels)), labels]))


def negative_log_likelihood(log_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
  """Mean NLL of softmax(log_probs / T): what temperature scaling minimises, reported before and after."""
  return _nll(*_check_log_probs(log_probs, labels), temperature)


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
  """The T in [0.05, 20] minimising the NLL of softmax(log_probs / T), by golden-section search in log T.

  `log_probs` are log-softmax outputs (possibly averaged over views, hence not normalised): dividing them
  by T and renormalising is the same as dividing the logits by T. The NLL is convex in 1/T, so it is
  unimodal in log T and a bounded golden-section search finds the minimum without gradients, step sizes
  or randomness; a minimum beyond the bounds returns the nearest bound.
  """
  log_probs, labels = _check_log_probs(log_probs, labels)

  def loss(log_t: float) -> float:
    return _nll(log_probs, labels, math.exp(log_t))

  lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
  a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
  loss_a, loss_b = loss(a), loss(b)
  while hi - lo > _LOG_TOLERANCE:
    if loss_a <= loss_b:
      hi, b, loss_b = b, a, loss_a
      a = hi - _GOLDEN * (hi - lo)
      loss_a = loss(a)
    else:
      lo, a, loss_a = a, b, loss_b
      b = lo + _GOLDEN * (hi - lo)
      loss_b = loss(b)
  return math.exp((lo + hi) / 2)


def apply_temperature(log_probs: np.ndarray, temperature: float) -> np.ndarray:
  """Calibrated probabilities softmax(log_probs / T), float64[n, C]."""
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  return np.exp(_log_softmax(np.asarray(log_probs, np.float64) / temperature))


def _balanced_accuracy_at(thresholds: np.ndarray, p: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Balanced accuracy of "positive if p >= t" for every t at once, by binary search in the sorted scores."""
  positives, negatives = np.sort(p[y]), np.sort(p[~y])
  true_positive_rate = 1 - np.searchsorted(positives, thresholds, side="left") / len(positives)
  true_negative_rate = np.searchsorted(negatives, thresholds, side="left") / len(negatives)
  return (true_positive_rate + true_negative_rate) / 2


def choose_threshold(p: np.ndarray, y: np.ndarray) -> float:
  """The threshold on p_positive that maximises balanced accuracy on validation scores.

  Balanced accuracy (mean of the two class recalls) because the folders are imbalanced: maximising plain
  accuracy would push the threshold toward always predicting the majority class. Thresholds that classify
  the validation set the same way are equivalent, so candidates are 0.5 (kept when it is as good as any,
  since the data give no reason to move it), the midpoints between consecutive distinct scores (a margin on
  both sides instead of sitting on a validation score) and the two extremes; ties go to the candidate
  closest to 0.5. With only one class present there is nothing to balance, and 0.5 is returned.
  """
  p = np.asarray(p, np.float64)
  y = np.asarray(y).astype(bool)
  if p.ndim != 1 or y.shape != p.shape:
    raise ValueError(f"need 1-D scores and labels of one length, got shapes {p.shape} and {y.shape}")
  if not (y.any() and not y.all()):
    return 0.5
  scores = np.unique(p)
  candidates = np.r_[0.5, scores[0], (scores[:-1] + scores[1:]) / 2, np.nextafter(scores[-1], np.inf)]
  balanced = _balanced_accuracy_at(candidates, p, y)
  best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
  return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
