"""Class weights and the class-weighted softmax cross-entropy the detector is trained with."""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax


def class_weights(setting: str | Sequence[float], counts: np.ndarray) -> np.ndarray:
  """Per-class loss weights from `config.class_weights` and the training split's class counts.

  "balanced" gives n / (k * count_c), so each class contributes equally to the loss however
  imbalanced the folder is; "none" gives ones; explicit values come as "w0,w1" or a sequence.
  """
  num_classes = len(counts)
  if isinstance(setting, str) and setting.strip().lower() == "balanced":
    if np.any(counts == 0):
      raise ValueError(f"class_weights='balanced' needs every class in the training split; counts are {counts.tolist()}")
    return (counts.sum() / (num_classes * counts)).astype(np.float32)
  if isinstance(setting, str) and setting.strip().lower() == "none":
    return np.ones(num_classes, np.float32)
  try:
    values = [float(v) for v in (setting.split(",") if isinstance(setting, str) else setting)]
  except ValueError as error:
    raise ValueError(f"class_weights={setting!r}: use 'balanced', 'none' or {num_classes} numbers like "
                     f"'1.0,2.0'") from error
  if len(values) != num_classes or any(not np.isfinite(v) or v < 0 for v in values) or sum(values) == 0:
    raise ValueError(f"class_weights={setting!r}: need {num_classes} finite non-negative weights, not all zero")
  return np.asarray(values, np.float32)


def weighted_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray,
                           mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Returns (loss, per-example loss, per-example weight); loss = sum(w * ce) / sum(w), as torch's.

  The per-example weight is the class weight of the label times the mask, so padding weighs nothing.
  """
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  example_weight = weights[labels] * mask.astype(jnp.float32)
  loss = jnp.sum(per_example * example_weight) / jnp.maximum(jnp.sum(example_weight), 1e-12)
  return loss, per_example, example_weight
