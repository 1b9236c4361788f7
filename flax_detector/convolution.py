"""Convolutions computed by oneDNN on CPU where model.library chooses it (flax_detector.compute_library).

Every float32, stride-1, undilated, ungrouped NHWC/HWIO convolution with explicit non-negative padding
goes to oneDNN as three custom calls (flax_detector.onednn_calls); anything else stays with XLA. Results
match XLA's convolution to float32 rounding and are bitwise repeatable run to run on the same machine and
thread count (tests/test_convolution.py). For evaluation and prediction, `conv_bias_relu` runs
relu(conv + bias) as one oneDNN primitive.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flax_detector import compute_library, onednn, onednn_calls, xla_ffi

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")

# forward (inputs, kernel), input gradient, kernel gradient: custom calls, differentiable as one function
_onednn_convolution = onednn_calls.operation("convolution", onednn.ConvolutionShape.from_geometry, onednn.convolution)
_BIAS_RELU_TARGET = "flax_detector_onednn_convolution_bias_relu"
_convolution_of = onednn_calls.by_geometry(onednn.ConvolutionShape.from_geometry, onednn.convolution)
onednn_calls.count_flops(_BIAS_RELU_TARGET, onednn.ConvolutionShape.from_geometry)


def conv_general_dilated_for(choice: str) -> Callable[..., jax.Array] | None:
  """The `conv_general_dilated` to give flax.linen.Conv for model.library: None (Flax's default, XLA) or
  the oneDNN one."""
  return onednn_conv_general_dilated if compute_library.uses_onednn(choice) else None


def _onednn_shape(
  inputs: jax.Array,
  kernel: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None,
  rhs_dilation: Sequence[int] | None,
  dimension_numbers: Any,
  feature_group_count: int,
) -> onednn.ConvolutionShape | None:
  """The oneDNN shape for a convolution it computes, or None for one left to XLA."""
  if inputs.ndim != 4 or kernel.ndim != 4 or isinstance(padding, str):
    return None
  dimension_numbers = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, dimension_numbers)
  plain = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, _NHWC_HWIO)
  if (
    dimension_numbers != plain
    or inputs.dtype != jnp.float32
    or kernel.dtype != jnp.float32
    or feature_group_count != 1
    or any(stride != 1 for stride in window_strides)
    or any(d != 1 for d in (lhs_dilation or ()))
    or any(d != 1 for d in (rhs_dilation or ()))
    or any(int(side) < 0 for pair in padding for side in pair)
  ):
    return None
  (top, bottom), (left, right) = ((int(low), int(high)) for low, high in padding)
  batch, height, width, in_channels = inputs.shape
  kernel_height, kernel_width, _, out_channels = kernel.shape
  return onednn.ConvolutionShape(
    batch, height, width, in_channels, out_channels, kernel_height, kernel_width, ((top, bottom), (left, right))
  )


def onednn_conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """lax.conv_general_dilated's signature; oneDNN where `_onednn_shape` allows, XLA for anything else."""
  shape = None
  if batch_group_count == 1 and preferred_element_type in (None, jnp.float32):
    shape = _onednn_shape(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
    )
  if shape is None:
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
    )
  return _onednn_convolution(lhs, rhs, shape)


def conv_bias_relu(
  choice: str, inputs: jax.Array, kernel: jax.Array, bias: jax.Array, padding: Sequence[tuple[int, int]]
) -> jax.Array | None:
  """relu(conv(inputs, kernel) + bias) for a stride-1 NHWC/HWIO convolution as one oneDNN primitive, where
  model.library computes convolutions with oneDNN and it takes this one; None otherwise (the caller
  computes it as before).

  Evaluation and prediction only need this forward pass: it saves XLA's separate bias-and-ReLU pass over
  every activation. It stays differentiable (Grad-CAM differentiates the evaluation model) through the
  training convolution, as relu(conv + bias).
  """
  if not compute_library.uses_onednn(choice):
    return None
  padding = tuple(tuple(pair) for pair in padding)
  shape = _onednn_shape(inputs, kernel, (1, 1), padding, None, None, _NHWC_HWIO, 1)
  if shape is None or bias.shape != (shape.out_channels,) or bias.dtype != jnp.float32:
    return None
  return _fused_bias_relu(inputs, kernel, bias, shape)


@functools.cache
def _register_bias_relu_target() -> None:
  def run(operands: Sequence[int], results: Sequence[int], attributes: dict[str, tuple[int, ...]]) -> None:
    _convolution_of(attributes["geometry"]).run_with_bias_and_relu(*operands, results[0])

  xla_ffi.register_cpu_target(_BIAS_RELU_TARGET, run)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fused_bias_relu(
  inputs: jax.Array, kernel: jax.Array, bias: jax.Array, shape: onednn.ConvolutionShape
) -> jax.Array:
  _register_bias_relu_target()
  result = jax.ShapeDtypeStruct(shape.result_shape("forward"), jnp.float32)
  return jax.ffi.ffi_call(_BIAS_RELU_TARGET, result)(inputs, kernel, bias, geometry=shape.geometry)


@_fused_bias_relu.defjvp
def _fused_bias_relu_jvp(
  shape: onednn.ConvolutionShape, primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array]:
  return jax.jvp(lambda x, k, b: jax.nn.relu(_onednn_convolution(x, k, shape) + b), primals, tangents)
