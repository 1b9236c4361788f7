"""CLU metric collections for training and evaluation, and the precision/recall/F1 derived from them.

Metrics are built inside the jitted steps from per-example values and a mask, so padded eval
examples count for nothing and every real example counts once; the host merges them and pulls
them off the device only when it reports.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics


@flax.struct.dataclass
class ClassWeightedLoss(clu_metrics.Average):
  """Mean of the per-example loss weighted by class weight x mask: the training objective."""

  @classmethod
  def from_model_output(cls, *, per_example_loss: jnp.ndarray, example_weight: jnp.ndarray, **_) -> "ClassWeightedLoss":
    return cls(total=jnp.sum(per_example_loss * example_weight), count=jnp.sum(example_weight))


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """counts[true class, predicted class] over the unmasked examples."""

  counts: jnp.ndarray

  @classmethod
  def from_model_output(cls, *, logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray, **_) -> "ConfusionMatrix":
    num_classes = logits.shape[-1]
    truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
    predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.int32)
    return cls(counts=truth.T @ predicted)

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(counts=self.counts + other.counts)

  def compute(self) -> jnp.ndarray:
    return self.counts


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  train_loss: ClassWeightedLoss
  train_accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  eval_loss: ClassWeightedLoss
  eval_accuracy: clu_metrics.Accuracy
  confusion_matrix: ConfusionMatrix


def precision_recall_f1(confusion: np.ndarray, positive_index: int) -> dict[str, float]:
  """Precision, recall and F1 of class `positive_index`; 0.0 where a ratio has no denominator."""
  true_positive = float(confusion[positive_index, positive_index])
  predicted_positive = float(confusion[:, positive_index].sum())
  actual_positive = float(confusion[positive_index, :].sum())
  precision = true_positive / predicted_positive if predicted_positive else 0.0
  recall = true_positive / actual_positive if actual_positive else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"eval_precision": precision, "eval_recall": recall, "eval_f1": f1}


def summarize_eval(metrics: EvalMetrics, positive_index: int) -> dict[str, Any]:
  """Host-side summary of an evaluation: scalars, confusion matrix and example count."""
  computed = jax.device_get(metrics.compute())
  confusion = np.asarray(computed.pop("confusion_matrix"), np.int64)
  summary: dict[str, Any] = {name: float(value) for name, value in computed.items()}
  summary.update(precision_recall_f1(confusion, positive_index))
  summary["confusion_matrix"] = confusion.tolist()
  summary["num_examples"] = int(confusion.sum())
  return summary
