import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import losses


def test_balanced_weights_are_n_over_k_count():
  np.testing.assert_allclose(losses.class_weights("balanced", np.array([200, 100])), [300 / 400, 300 / 200])
  np.testing.assert_allclose(losses.class_weights("none", np.array([200, 100])), [1, 1])
  np.testing.assert_allclose(losses.class_weights((1.0, 3.5), np.array([200, 100])), [1, 3.5])


def test_balanced_needs_every_class():
  with pytest.raises(ValueError, match="balanced"):
    losses.class_weights("balanced", np.array([10, 0]))


def test_weighted_cross_entropy_matches_a_hand_computation():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -5.0]])
  labels = jnp.array([0, 1, 1, 1])
  mask = jnp.array([True, True, True, False])
  weights = jnp.array([0.5, 2.0])
  loss, per_example, example_weight = losses.weighted_cross_entropy(logits, labels, weights, mask)
  ce = -np.log(
    np.exp(np.take_along_axis(np.asarray(logits), np.asarray(labels)[:, None], 1)[:, 0])
    / np.exp(np.asarray(logits)).sum(1)
  )
  np.testing.assert_allclose(per_example, ce, rtol=1e-5)
  np.testing.assert_allclose(example_weight, [0.5, 2.0, 2.0, 0.0])
  np.testing.assert_allclose(loss, (0.5 * ce[0] + 2 * ce[1] + 2 * ce[2]) / 4.5, rtol=1e-5)
