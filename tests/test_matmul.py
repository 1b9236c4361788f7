"""oneDNN's Dense-layer products (flax_detector.matmul) against XLA's: values, both gradients, repeatability,
what stays with XLA, and their FLOPs. They need libdnnl (the `onednn-cpu-gomp` wheel on x86-64 Linux)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import matmul, onednn, onednn_calls

_DENSE = (((1,), (0,)), ((), ()))


pytestmark = pytest.mark.skipif(onednn.why_unavailable() is not None, reason=str(onednn.why_unavailable()))


def _value_and_gradients(dot_general, inputs, kernel):
  def loss(x, w):
    outputs = dot_general(x, w, _DENSE)
    return jnp.sum(jnp.sin(outputs)), outputs

  (_, outputs), gradients = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(inputs, kernel)
  return outputs, *gradients


@pytest.mark.parametrize("rows, depth, columns", [(32, 300, 70), (5, 17, 1), (64, 512, 2), (1, 1, 1)])
def test_forward_and_both_gradients_match_xla(rows, depth, columns):
  inputs = jax.random.normal(jax.random.key(0), (rows, depth))
  kernel = jax.random.normal(jax.random.key(1), (depth, columns)) / depth**0.5
  ours = _value_and_gradients(matmul.onednn_dot_general, inputs, kernel)
  reference = _value_and_gradients(jax.lax.dot_general, inputs, kernel)
  for name, actual, expected in zip(("forward", "input gradient", "kernel gradient"), ours, reference, strict=True):
    assert actual.shape == expected.shape, name
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))), err_msg=name)
  again = _value_and_gradients(matmul.onednn_dot_general, inputs, kernel)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(ours, again))


def test_products_onednn_does_not_take_stay_with_xla():
  x, w = jnp.ones((4, 6)), jnp.ones((6, 3))
  cases = {
    "bfloat16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), _DENSE, {}),
    "3-D inputs": (jnp.ones((2, 4, 6)), w, (((2,), (0,)), ((), ())), {}),
    "transposed kernel": (x, w.T, (((1,), (1,)), ((), ())), {}),
    "other result type": (x, w, _DENSE, {"preferred_element_type": jnp.bfloat16}),
  }
  for name, (lhs, rhs, dimensions, options) in cases.items():
    ours = lambda a, b, d=dimensions, o=options: matmul.onednn_dot_general(a, b, d, **o)  # noqa: E731
    assert "flax_detector_onednn" not in str(jax.make_jaxpr(ours)(lhs, rhs)), name
    expected = jax.lax.dot_general(lhs, rhs, dimensions, **options)
    np.testing.assert_array_equal(jax.jit(ours)(lhs, rhs), expected, err_msg=name)


def test_host_flops_counts_the_three_products():
  inputs, kernel = jnp.ones((8, 30)), jnp.ones((30, 5))
  shape = onednn.MatmulShape(8, 30, 5)
  assert shape.flops == 2 * 8 * 30 * 5

  def loss(x, w):
    return jnp.sum(matmul.onednn_dot_general(x, w, _DENSE) ** 2)

  def counted(argnums):
    return onednn_calls.host_flops(jax.jit(jax.grad(loss, argnums=argnums)).trace(inputs, kernel).jaxpr.jaxpr)

  assert counted((0, 1)) == 3 * shape.flops
  # Only the kernel gradient is read: XLA drops the input gradient's call, and it is not counted.
  assert counted(1) == 2 * shape.flops


def test_the_primitives_read_transposed_operands_in_place():
  """Each piece reads a row-major operand as its transpose through strides (no copy): check all three on
  numpy arrays against numpy's products."""
  rng = np.random.default_rng(0)
  inputs, kernel = rng.standard_normal((6, 9), np.float32), rng.standard_normal((9, 4), np.float32)
  output_gradient = rng.standard_normal((6, 4), np.float32)
  primitives = onednn.matmul(onednn.MatmulShape(6, 9, 4))
  np.testing.assert_allclose(primitives.forward(inputs, kernel), inputs @ kernel, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    primitives.input_gradient(output_gradient, kernel), output_gradient @ kernel.T, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    primitives.kernel_gradient(inputs, output_gradient), inputs.T @ output_gradient, rtol=1e-5, atol=1e-5
  )
