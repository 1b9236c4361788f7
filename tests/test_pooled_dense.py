"""PooledDense against what it stands for: adaptive_avg_pool, flatten and nn.Dense with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector.pooled_dense import PooledDense, adaptive_avg_pool

_SIDE = 7


def _loss_and_gradients(apply, params, x):
  def loss(params, x):
    outputs = apply(params, x)
    return jnp.sum(jnp.sin(outputs)), outputs

  (_, outputs), (param_gradients, input_gradient) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
    params, x
  )
  return outputs, param_gradients, input_gradient


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2), (2, 3), (5, 3), (7, 7), (9, 7), (14, 14)])
def test_matches_pool_flatten_dense_with_the_same_parameters(height, width):
  """With fewer than 7x7 cells the kernel is contracted with the pooling weights; otherwise the input is
  pooled as before (7x7 is the identity, larger maps average). Outputs and all gradients agree either way."""
  channels, features = 6, 5
  x = jax.random.normal(jax.random.key(0), (4, height, width, channels))
  pooled_dense = PooledDense(features, _SIDE, nn.initializers.normal(1.0))
  params = pooled_dense.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  dense = nn.Dense(features)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, dense.init(jax.random.key(1), jnp.zeros((1, _SIDE * _SIDE * channels)))
  )

  ours = _loss_and_gradients(pooled_dense.apply, params, x)
  reference = _loss_and_gradients(
    lambda p, x: dense.apply(p, adaptive_avg_pool(x, _SIDE).reshape(x.shape[0], -1)), params, x
  )
  for actual, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(expected))))


def test_same_parameters_as_the_dense_layer_it_stands_for():
  """Initialised under the same name and key, PooledDense and nn.Dense give the same kernel and bias bitwise,
  so a run's initial weights do not depend on which one the model uses."""
  x = jnp.zeros((1, 2, 2, 8))

  class WithPooledDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return PooledDense(3, _SIDE, nn.initializers.normal(0.01), name="Dense_0")(x)

  class WithDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, kernel_init=nn.initializers.normal(0.01), name="Dense_0")(x)

  ours = WithPooledDense().init(jax.random.key(4), x)
  reference = WithDense().init(jax.random.key(4), jnp.zeros((1, _SIDE * _SIDE * 8)))
  for actual, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
    assert np.asarray(actual).tobytes() == np.asarray(expected).tobytes()


def test_bfloat16_compute_agrees_with_pooling_first():
  """The fold runs on the float32 kernel, before the cast to the compute dtype."""
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 16))
  pooled_dense = PooledDense(8, _SIDE, nn.initializers.normal(1.0), dtype=jnp.bfloat16)
  params = pooled_dense.init(jax.random.key(1), x)
  dense = nn.Dense(8, dtype=jnp.bfloat16)
  ours = pooled_dense.apply(params, x)
  reference = dense.apply(params, adaptive_avg_pool(x.astype(jnp.bfloat16), _SIDE).reshape(4, -1))
  assert ours.dtype == reference.dtype == jnp.bfloat16
  ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
  np.testing.assert_allclose(ours, reference, rtol=2e-2, atol=2e-2 * float(np.max(np.abs(reference))))
