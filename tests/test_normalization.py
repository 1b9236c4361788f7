"""Training's BatchNorm + ReLU in oneDNN (flax_detector.normalization) against Flax's BatchNorm and a ReLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_detector import normalization

_EPSILON = 1e-5


def _flax_batch_norm_relu(x, scale, shift):
  """relu(nn.BatchNorm(x)) on the batch's statistics, with the mean and (biased) variance Flax averages."""
  channels = x.shape[-1]
  variables = {
    "params": {"scale": scale, "bias": shift},
    "batch_stats": {"mean": jnp.zeros(channels), "var": jnp.ones(channels)},
  }
  norm = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=_EPSILON)
  outputs, state = norm.apply(variables, x, mutable=["batch_stats"])
  return nn.relu(outputs), state["batch_stats"]["mean"], state["batch_stats"]["var"]


def _onednn_batch_norm_relu(x, scale, shift):
  return normalization.batch_norm_relu("onednn", x, scale, shift, _EPSILON)


def _arrays(shape=(4, 9, 7, 5)):
  keys = jax.random.split(jax.random.key(3), 3)
  x = 2.0 * jax.random.normal(keys[0], shape) + 1.0  # statistics far from 0 and 1
  return x, jax.random.normal(keys[1], shape[-1:]), jax.random.normal(keys[2], shape[-1:])


def test_outputs_statistics_and_gradients_match_flax_batch_norm_and_relu(onednn_allowed):
  x, scale, shift = _arrays()
  actual = jax.jit(_onednn_batch_norm_relu)(x, scale, shift)
  expected = _flax_batch_norm_relu(x, scale, shift)
  for ours, flax in zip(actual, expected, strict=True):
    np.testing.assert_allclose(ours, flax, rtol=1e-5, atol=1e-5)
  assert 0.2 < float(jnp.mean(actual[0] == 0)) < 0.8  # the ReLU did cut, and not everything

  def loss(function):
    return lambda *arrays: jnp.sum(jnp.sin(3.0 * function(*arrays)[0]))

  gradients = jax.jit(jax.grad(loss(_onednn_batch_norm_relu), argnums=(0, 1, 2)))(x, scale, shift)
  wanted = jax.grad(loss(_flax_batch_norm_relu), argnums=(0, 1, 2))(x, scale, shift)
  for ours, flax in zip(gradients, wanted, strict=True):
    np.testing.assert_allclose(ours, flax, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(flax))))
  # The statistics feed the running averages only: no gradient flows back through them.
  statistics_gradient = jax.grad(lambda x: jnp.sum(_onednn_batch_norm_relu(x, scale, shift)[1]))(x)
  np.testing.assert_array_equal(statistics_gradient, 0.0)


def test_results_are_bitwise_repeatable(onednn_allowed):
  x, scale, shift = _arrays((8, 16, 16, 8))
  step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(_onednn_batch_norm_relu(*a)[0] ** 2), argnums=(0, 1, 2)))
  first, again = step(x, scale, shift), step(x, scale, shift)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True))


def test_declines_what_it_cannot_take(onednn_allowed):
  x, scale, shift = _arrays()
  assert normalization.batch_norm_relu("xla", x, scale, shift, _EPSILON) is None
  assert normalization.batch_norm_relu("onednn", x.astype(jnp.bfloat16), scale, shift, _EPSILON) is None
  assert normalization.batch_norm_relu("onednn", x, scale[:3], shift, _EPSILON) is None
  assert normalization.batch_norm_relu("onednn", x[0], scale, shift, _EPSILON) is None
  side = int((normalization.LARGEST_ACTIVATIONS / 5) ** 0.5) + 1
  large = jnp.zeros((1, side, side, 5))
  assert normalization.batch_norm_relu("onednn", large, scale, shift, _EPSILON) is None
  assert normalization.batch_norm_relu("onednn", large[:, :-2], scale, shift, _EPSILON) is not None
