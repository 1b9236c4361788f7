"""Training's BatchNorm + ReLU computed by oneDNN on CPU where model.library chooses it (flax_detector.compute_library).

Why: XLA's CPU fusions of Flax's BatchNorm and the ReLU after it, forward and backward, take 2.5-8x as long as
oneDNN's batch normalization with the ReLU fused in, on every shape of VGG16 (benchmarks/RESULTS.md), and the
cpu preset's few channels (8-64 in the minor dimension) leave XLA's reductions mostly unvectorised.

Two XLA custom calls under one custom VJP: the forward pass (activations, scale, shift) -> (outputs, batch mean,
batch variance, ReLU mask) and the backward pass (the gradients of activations, scale and shift). The batch's
statistics come back for the running averages, under stop_gradient, as Flax's BatchNorm treats them. Evaluation
folds the running statistics into the convolutions (models.conv_relu_for_evaluation) and does not come here.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_detector import compute_library, onednn, onednn_calls, xla_ffi

# Larger activations stay with XLA. Measured on full-width VGG16-BN (benchmarks/RESULTS.md): with oneDNN for its
# 4-8 M-element layers (64 and 128 channels, batch 32) the step is ~6% slower, although oneDNN's kernels alone
# are 2.5-4x faster there. Probably (not proven) XLA's passes over those layers run beside the convolutions'
# oneDNN calls, which keep the cores only ~80% busy, while a oneDNN call waits its turn (onednn's lock).
LARGEST_ACTIVATIONS = 2**21
_FORWARD_TARGET = "flax_detector_onednn_batch_norm_relu_forward"
_BACKWARD_TARGET = "flax_detector_onednn_batch_norm_relu_backward"


def batch_norm_relu(
  library: str, x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array] | None:
  """(relu(BatchNorm(x)), batch mean, batch variance) of NHWC activations with the batch's own statistics
  (the variance biased, as Flax's), where model.library computes with oneDNN and it takes these arrays
  (float32, at most LARGEST_ACTIVATIONS elements); None otherwise, for the caller to compute it with Flax."""
  if not compute_library.uses_onednn(library):
    return None
  if x.ndim != 4 or x.size > LARGEST_ACTIVATIONS or scale.shape != x.shape[-1:] or shift.shape != x.shape[-1:]:
    return None
  if any(array.dtype != jnp.float32 for array in (x, scale, shift)):
    return None
  outputs, mean, variance = _batch_norm_relu(x, scale, shift, onednn.BatchNormShape(*x.shape, float(epsilon)))
  return outputs, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(variance)


_primitives_of = onednn_calls.by_geometry(onednn.BatchNormShape.from_attributes, onednn.batch_norm_relu)


def _primitives(attributes: dict[str, tuple]) -> onednn.BatchNormRelu:
  return _primitives_of(attributes["geometry"], *attributes["epsilon"])


@functools.cache
def _register_targets() -> None:
  def forward(operands: Sequence[int], results: Sequence[int], attributes: dict[str, tuple]) -> None:
    _primitives(attributes).forward(*operands, *results)

  def backward(operands: Sequence[int], results: Sequence[int], attributes: dict[str, tuple]) -> None:
    _primitives(attributes).backward(*operands, *results)

  xla_ffi.register_cpu_target(_FORWARD_TARGET, forward)
  xla_ffi.register_cpu_target(_BACKWARD_TARGET, backward)


def _call(target: str, shape: onednn.BatchNormShape, results: list[jax.ShapeDtypeStruct], *operands: jax.Array):
  _register_targets()
  attributes = {"geometry": shape.geometry, "epsilon": np.array([shape.epsilon], np.float32)}
  return jax.ffi.ffi_call(target, results)(*operands, **attributes)


def _forward_call(
  x: jax.Array, scale: jax.Array, shift: jax.Array, shape: onednn.BatchNormShape
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  vector = jax.ShapeDtypeStruct((shape.channels,), jnp.float32)
  workspace = jax.ShapeDtypeStruct((onednn.batch_norm_relu(shape).workspace_bytes,), jnp.uint8)
  return _call(
    _FORWARD_TARGET, shape, [jax.ShapeDtypeStruct(x.shape, jnp.float32), vector, vector, workspace], x, scale, shift
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_relu(
  x: jax.Array, scale: jax.Array, shift: jax.Array, shape: onednn.BatchNormShape
) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _forward_call(x, scale, shift, shape)[:3]


def _batch_norm_relu_forward(
  x: jax.Array, scale: jax.Array, shift: jax.Array, shape: onednn.BatchNormShape
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
  outputs, mean, variance, workspace = _forward_call(x, scale, shift, shape)
  return (outputs, mean, variance), (x, mean, variance, scale, workspace)


def _batch_norm_relu_backward(
  shape: onednn.BatchNormShape, residuals: tuple[jax.Array, ...], cotangents: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  # The statistics leave batch_norm_relu under stop_gradient: their cotangents are 0 and only the outputs' count.
  x, mean, variance, scale, workspace = residuals
  vector = jax.ShapeDtypeStruct((shape.channels,), jnp.float32)
  results = [jax.ShapeDtypeStruct(x.shape, jnp.float32), vector, vector]
  return tuple(_call(_BACKWARD_TARGET, shape, results, x, cotangents[0], mean, variance, scale, workspace))


_batch_norm_relu.defvjp(_batch_norm_relu_forward, _batch_norm_relu_backward)
