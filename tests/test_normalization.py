"""Training's BatchNorm + ReLU (flax_detector.normalization), oneDNN's and XLA's, against Flax's and a ReLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import normalization

_EPSILON = 1e-5


def _flax_batch_norm_relu(x, scale, shift):
  """relu(nn.BatchNorm(x)) on the batch's statistics, with the mean and (biased) variance Flax averages."""
  channels = x.shape[-1]
  variables = {
    "params": {"scale": scale, "bias": shift},
    "batch_stats": {"mean": jnp.zeros(channels), "var": jnp.ones(channels)},
  }
  norm = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=_EPSILON, dtype=x.dtype)  # as the model
  outputs, state = norm.apply(variables, x, mutable=["batch_stats"])
  return nn.relu(outputs), state["batch_stats"]["mean"], state["batch_stats"]["var"]


def _ours(library):
  return lambda x, scale, shift: normalization.batch_norm_relu(library, x, scale, shift, _EPSILON)


def _arrays(shape=(4, 9, 7, 5)):
  keys = jax.random.split(jax.random.key(3), 3)
  x = 2.0 * jax.random.normal(keys[0], shape) + 1.0  # statistics far from 0 and 1
  return x, jax.random.normal(keys[1], shape[-1:]), jax.random.normal(keys[2], shape[-1:])


@pytest.mark.parametrize("library", ["onednn", "xla"])
def test_outputs_statistics_and_gradients_match_flax_batch_norm_and_relu(request, library):
  if library == "onednn":
    request.getfixturevalue("onednn_allowed")
  x, scale, shift = _arrays()
  actual = jax.jit(_ours(library))(x, scale, shift)
  expected = _flax_batch_norm_relu(x, scale, shift)
  for ours, flax in zip(actual, expected, strict=True):
    np.testing.assert_allclose(ours, flax, rtol=1e-5, atol=1e-5)
  assert 0.2 < float(jnp.mean(actual[0] == 0)) < 0.8  # the ReLU did cut, and not everything

  def loss(function):
    return lambda *arrays: jnp.sum(jnp.sin(3.0 * function(*arrays)[0]))

  gradients = jax.jit(jax.grad(loss(_ours(library)), argnums=(0, 1, 2)))(x, scale, shift)
  wanted = jax.grad(loss(_flax_batch_norm_relu), argnums=(0, 1, 2))(x, scale, shift)
  for ours, flax in zip(gradients, wanted, strict=True):
    np.testing.assert_allclose(ours, flax, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(flax))))
  # The statistics feed the running averages only: no gradient flows back through them.
  statistics_gradient = jax.grad(lambda x: jnp.sum(_ours(library)(x, scale, shift)[1]))(x)
  np.testing.assert_array_equal(statistics_gradient, 0.0)


def test_xla_in_bfloat16_matches_flax_within_its_rounding():
  """Mixed precision as on accelerators: bfloat16 activations, float32 statistics and parameters."""
  x, scale, shift = _arrays((8, 6, 6, 16))
  x = x.astype(jnp.bfloat16)
  outputs, mean, variance = jax.jit(_ours("xla"))(x, scale, shift)
  flax_outputs, flax_mean, flax_variance = _flax_batch_norm_relu(x, scale, shift)
  assert outputs.dtype == jnp.bfloat16 and mean.dtype == variance.dtype == jnp.float32
  np.testing.assert_allclose(mean, flax_mean, rtol=1e-6)
  np.testing.assert_allclose(variance, flax_variance, rtol=1e-6)
  np.testing.assert_allclose(outputs.astype(jnp.float32), flax_outputs.astype(jnp.float32), rtol=1e-2, atol=1e-2)

  def loss(function):
    return lambda *arrays: jnp.sum(jnp.sin(3.0 * function(*arrays)[0].astype(jnp.float32)))

  gradients = jax.jit(jax.grad(loss(_ours("xla")), argnums=(0, 1, 2)))(x, scale, shift)
  wanted = jax.grad(loss(_flax_batch_norm_relu), argnums=(0, 1, 2))(x, scale, shift)
  exact = jax.grad(loss(_flax_batch_norm_relu), argnums=(0, 1, 2))(x.astype(jnp.float32), scale, shift)
  assert gradients[0].dtype == jnp.bfloat16
  for ours, flax, reference in zip(gradients, wanted, exact, strict=True):
    ours, flax = np.asarray(ours, np.float32), np.asarray(flax, np.float32)
    np.testing.assert_allclose(ours, flax, rtol=3e-2, atol=3e-2 * float(np.max(np.abs(flax))))
    # Against the same function in float32, ours is no further off than Flax's own bfloat16 gradient.
    assert np.linalg.norm(ours - reference) <= 1.05 * np.linalg.norm(flax - reference) + 1e-6


def test_results_are_bitwise_repeatable(onednn_allowed):
  x, scale, shift = _arrays((8, 16, 16, 8))
  step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(_ours("onednn")(*a)[0] ** 2), argnums=(0, 1, 2)))
  first, again = step(x, scale, shift), step(x, scale, shift)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True))


def _computed_by_onednn(library, x, scale, shift):
  program = jax.jit(_ours(library)).lower(x, scale, shift).as_text()
  return "flax_detector_onednn_batch_norm_relu_forward" in program


def test_onednn_declines_what_it_cannot_take_and_xla_computes_it(onednn_allowed):
  x, scale, shift = _arrays()
  assert _computed_by_onednn("onednn", x, scale, shift)
  assert not _computed_by_onednn("xla", x, scale, shift)
  assert not _computed_by_onednn("onednn", x.astype(jnp.bfloat16), scale, shift)
  for library in ("onednn", "xla"):  # neither computes what is not NHWC with one scale and shift per channel
    with pytest.raises(ValueError, match="NHWC activations and one scale and shift per channel"):
      _ours(library)(x, scale[:3], shift)
    with pytest.raises(ValueError, match="NHWC activations"):
      _ours(library)(x[0], scale, shift)
  side = int((normalization.LARGEST_ACTIVATIONS / 5) ** 0.5) + 1
  large = jnp.zeros((1, side, side, 5))
  assert not _computed_by_onednn("onednn", large, scale, shift)
  assert _computed_by_onednn("onednn", large[:, :-2], scale, shift)
