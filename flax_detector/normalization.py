"""Training's BatchNorm + ReLU on the batch's statistics: oneDNN's primitives on CPU where model.library chooses
them (flax_detector.compute_library), otherwise one XLA function with a backward pass of two passes over memory.

Why oneDNN: XLA's CPU fusions of Flax's BatchNorm and the ReLU after it, forward and backward, take 2.5-8x as long
as oneDNN's batch normalization with the ReLU fused in, on every shape of VGG16 (benchmarks/RESULTS.md), and the
cpu preset's few channels (8-64 in the minor dimension) leave XLA's reductions mostly unvectorised. Two XLA
custom calls under one custom VJP: the forward pass (activations, scale, shift) -> (outputs, batch mean, batch
variance, ReLU mask) and the backward pass (the gradients of activations, scale and shift).

Why the XLA function: autodiff of Flax's BatchNorm and ReLU gives XLA:GPU three passes over each layer's
activations backward: a reduction that writes the ReLU-masked gradient, a second reduction that reads it back
for its plain sum, then the input gradient. Here the backward is written out: one reduction of both sums
(the ReLU mask recomputed from the input, so no masked gradient is written) and one elementwise pass for the
input gradient. Compiled for an H200 (benchmarks/accelerator_hlo.py), VGG16-BN's step at 224 px, batch 128
moves 6.7 GB less, of 38 outside its convolutions and matmuls (benchmarks/RESULTS.md, session 18); on this
CPU's XLA path and in XLA:TPU's cost analysis it is within the noise. The forward pass is Flax's arithmetic,
operation for operation.

Both return the batch's statistics, under stop_gradient, for the running averages, as Flax's BatchNorm treats
them. Evaluation folds the running statistics into the convolutions (models.conv_relu_for_evaluation) and does
not come here.
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(relu(BatchNorm(x)), batch mean, batch variance) of NHWC activations with the batch's own statistics (the
  variance biased, as Flax's; the statistics in float32, the outputs in x's dtype). oneDNN computes it where
  model.library chooses oneDNN and it takes these arrays (float32, at most LARGEST_ACTIVATIONS elements), XLA
  otherwise."""
  if x.ndim != 4 or scale.shape != x.shape[-1:] or shift.shape != x.shape[-1:]:
    raise ValueError(
      f"batch_norm_relu takes NHWC activations and one scale and shift per channel; got {x.shape}, "
      f"{scale.shape}, {shift.shape}"
    )
  if _onednn_takes(library, x, scale, shift):
    outputs, mean, variance = _batch_norm_relu(x, scale, shift, onednn.BatchNormShape(*x.shape, float(epsilon)))
  else:
    outputs, mean, variance = _xla_batch_norm_relu(x, scale, shift, float(epsilon))
  return outputs, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(variance)


def _onednn_takes(library: str, x: jax.Array, scale: jax.Array, shift: jax.Array) -> bool:
  if not compute_library.uses_onednn(library):
    return False
  if x.size > LARGEST_ACTIVATIONS:
    return False
  return all(array.dtype == jnp.float32 for array in (x, scale, shift))


_REDUCED = (0, 1, 2)  # NHWC: every axis but the channels'


def _xla_forward(
  x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
  """Flax's BatchNorm arithmetic (float32 statistics by E[x^2] - E[x]^2, clipped at 0), then the ReLU; also
  1/sqrt(variance + epsilon) for the backward pass."""
  wide = x.astype(jnp.float32)
  mean = wide.mean(_REDUCED)
  variance = jnp.maximum(0.0, (wide * wide).mean(_REDUCED) - mean * mean)
  inverse_deviation = jax.lax.rsqrt(variance + epsilon)
  outputs = jnp.maximum((wide - mean) * (inverse_deviation * scale) + shift, 0.0).astype(x.dtype)
  return (outputs, mean, variance), inverse_deviation


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla_batch_norm_relu(
  x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _xla_forward(x, scale, shift, epsilon)[0]


def _xla_batch_norm_relu_forward(
  x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
  results, inverse_deviation = _xla_forward(x, scale, shift, epsilon)
  return results, (x, results[1], inverse_deviation, scale, shift)


def _xla_batch_norm_relu_backward(
  epsilon: float, residuals: tuple[jax.Array, ...], cotangents: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """With g the outputs' gradient where the ReLU passed, n values per channel and x^ the normalised input:
  d shift = sum(g), d scale = sum(g x^), dx = scale / sqrt(variance + epsilon) * (g - (sum(g) + x^ sum(g x^)) / n).
  Both sums come from one reduction over x and the outputs' gradient, dx from one pass over the same two."""
  del epsilon  # in the saved 1/sqrt(variance + epsilon)
  x, mean, inverse_deviation, scale, shift = residuals
  centred = x.astype(jnp.float32) - mean
  normalised = centred * inverse_deviation
  # The ReLU's mask from the forward pass's own expression, so it passes exactly what the forward passed.
  passed = jnp.where(centred * (inverse_deviation * scale) + shift > 0, cotangents[0].astype(jnp.float32), 0.0)
  shift_gradient, scale_gradient = passed.sum(_REDUCED), (passed * normalised).sum(_REDUCED)
  count = x.size // x.shape[-1]
  x_gradient = (inverse_deviation * scale) * (passed - (shift_gradient + normalised * scale_gradient) / count)
  # The statistics leave batch_norm_relu under stop_gradient: their cotangents are 0 and only the outputs' count.
  return x_gradient.astype(x.dtype), scale_gradient, shift_gradient


_xla_batch_norm_relu.defvjp(_xla_batch_norm_relu_forward, _xla_batch_norm_relu_backward)


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
