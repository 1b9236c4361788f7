import jax.numpy as jnp
import numpy as np

from flax_detector import metrics


def test_eval_metrics_count_only_unmasked_examples_and_derive_f1():
  logits = jnp.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  labels = jnp.array([1, 0, 1, 0, 1], jnp.int32)
  mask = jnp.array([True, True, True, True, False])
  weight = mask.astype(jnp.float32)
  first = metrics.EvalMetrics.single_from_model_output(
    logits=logits, labels=labels, mask=mask, per_example_loss=jnp.ones(5), example_weight=weight
  )
  second = metrics.EvalMetrics.single_from_model_output(
    logits=logits[:1], labels=labels[:1], mask=mask[:1], per_example_loss=jnp.full(1, 3.0), example_weight=weight[:1]
  )
  summary = metrics.summarize_eval(first.merge(second), positive_index=1)
  # true x predicted: human-art [1 right, 1 wrong]; ai-generated [1 missed, 2 found]
  assert summary["confusion_matrix"] == [[1, 1], [1, 2]]
  assert summary["num_examples"] == 5
  np.testing.assert_allclose(summary["eval_accuracy"], 3 / 5)
  np.testing.assert_allclose(summary["eval_loss"], (4 * 1 + 3) / 5)
  np.testing.assert_allclose(summary["eval_precision"], 2 / 3)
  np.testing.assert_allclose(summary["eval_recall"], 2 / 3)
  np.testing.assert_allclose(summary["eval_f1"], 2 / 3)


def test_precision_recall_without_positives_are_zero():
  assert metrics.precision_recall_f1(np.array([[5, 0], [0, 0]]), 1) == {
    "eval_precision": 0.0,
    "eval_recall": 0.0,
    "eval_f1": 0.0,
  }
