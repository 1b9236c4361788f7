"""Class weights and the class-weighted softmax cross-entropy the detector is trained with."""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax


def class_weights(setting: str | Sequence[float], counts: np.ndarray) -> np.ndarray:
  """Per-class loss weights from `config_validation.parse_class_weights`'s form and the training class counts.

  "balanced" gives n / (k * count_c), so each class contributes equally to the loss however
  imbalanced the folder is; "none" gives ones; a sequence gives those weights.
  """
  if setting == "balanced":
    if np.any(counts == 0):
      raise ValueError(
        f"class_weights='balanced' needs every class in the training split; counts are {counts.tolist()}"
      )
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)
  if setting == "none":
    return np.ones(len(counts), np.float32)
  return np.asarray(setting, np.float32)


def weighted_cross_entropy(
  logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray, mask: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Returns (loss, per-example loss, per-example weight); loss = sum(w * ce) / sum(w), as torch's.

  The per-example weight is the class weight of the label times the mask, so padding weighs nothing.
  """
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  example_weight = weights[labels] * mask.astype(jnp.float32)
  loss = jnp.sum(per_example * example_weight) / jnp.maximum(jnp.sum(example_weight), 1e-12)
  return loss, per_example, example_weight
