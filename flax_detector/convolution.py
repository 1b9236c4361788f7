"""Which library computes the model's convolutions: XLA's own, or oneDNN on CPU. Chosen at trace time.

`config.model.convolutions`:
  "xla":    lax.conv_general_dilated everywhere.
  "onednn": oneDNN (flax_detector.onednn) for every float32, stride-1, ungrouped NHWC convolution; an error
            where it cannot run (no libdnnl, not on CPU, several devices).
  "auto":   oneDNN where it can run, XLA otherwise: accelerators, multi-device meshes and bfloat16 get XLA,
            and a missing library only costs speed.

oneDNN runs as XLA custom calls (flax_detector.xla_ffi: oneDNN reads and writes XLA's buffers in place)
with a custom VJP: the forward pass, the input gradient and the kernel gradient are three separate calls, so
XLA drops the ones nobody uses (the first layer's input gradient). A call sees the whole array of the device
it runs on, hence the one-device condition: on a mesh of several devices XLA would gather every activation
onto one of them. Results match XLA's convolution to float32 rounding and are bitwise repeatable run to run
on the same machine and thread count (tests/test_convolution.py).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from absl import logging

from flax_detector import onednn, xla_ffi

CHOICES = ("auto", "xla", "onednn")
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def onednn_unusable_reason() -> str | None:
  """Why oneDNN cannot compute this process's convolutions, or None when it can."""
  if jax.default_backend() != "cpu":
    return f"the default JAX backend is {jax.default_backend()}, not cpu"
  if jax.device_count() != 1:
    return f"the mesh has {jax.device_count()} devices; oneDNN runs as a host callback on one device only"
  try:
    onednn.require()
  except onednn.OneDnnUnavailable as error:
    return str(error)
  return None


@functools.cache
def uses_onednn(choice: str) -> bool:
  """Resolves model.convolutions for this process (once per choice: the answer cannot change within it)."""
  if choice not in CHOICES:
    raise ValueError(f"model.convolutions={choice!r}: choose one of {', '.join(CHOICES)}")
  if choice == "xla":
    return False
  reason = onednn_unusable_reason()
  if reason is None:
    logging.info("Convolutions: oneDNN (model.convolutions=%r).", choice)
    return True
  if choice == "onednn":
    raise ValueError(f'model.convolutions="onednn" cannot run here: {reason}. Use "auto" or "xla".')
  logging.info("Convolutions: XLA (model.convolutions='auto': %s).", reason)
  return False


def conv_general_dilated_for(choice: str) -> Callable[..., jax.Array] | None:
  """The `conv_general_dilated` to give flax.linen.Conv: None (Flax's default, XLA) or the oneDNN one."""
  return onednn_conv_general_dilated if uses_onednn(choice) else None


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


# One XLA custom-call target per piece; each takes two operands and a `geometry` attribute (the shape).
_TARGETS = {piece: f"flax_detector_onednn_{piece}" for piece in ("forward", "input_gradient", "kernel_gradient")}


def _handler(piece: str) -> xla_ffi.HandlerFunction:
  def run(operands: Sequence[int], results: Sequence[int], attributes: dict[str, np.ndarray]) -> None:
    shape = onednn.ConvolutionShape.from_geometry(attributes["geometry"])
    onednn.convolution(shape).run(piece, operands[0], operands[1], results[0])

  return run


@functools.cache
def _register_targets() -> None:
  for piece, target in _TARGETS.items():
    xla_ffi.register_cpu_target(target, _handler(piece))


def _piece(piece: str, shape: onednn.ConvolutionShape, first: jax.Array, second: jax.Array) -> jax.Array:
  """One piece as an XLA custom call that oneDNN computes in place in XLA's buffers (flax_detector.xla_ffi)."""
  _register_targets()
  result = jax.ShapeDtypeStruct(shape.result_shape(piece), jnp.float32)
  return jax.ffi.ffi_call(_TARGETS[piece], result)(first, second, geometry=shape.geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_convolution(inputs: jax.Array, kernel: jax.Array, shape: onednn.ConvolutionShape) -> jax.Array:
  return _piece("forward", shape, inputs, kernel)


def _forward(
  inputs: jax.Array, kernel: jax.Array, shape: onednn.ConvolutionShape
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _onednn_convolution(inputs, kernel, shape), (inputs, kernel)


def _backward(
  shape: onednn.ConvolutionShape, residuals: tuple[jax.Array, jax.Array], output_gradient: jax.Array
) -> tuple[jax.Array, jax.Array]:
  inputs, kernel = residuals
  # Two callbacks, not one: XLA removes an unused one (the first layer's input gradient).
  input_gradient = _piece("input_gradient", shape, output_gradient, kernel)
  kernel_gradient = _piece("kernel_gradient", shape, inputs, output_gradient)
  return input_gradient, kernel_gradient


_onednn_convolution.defvjp(_forward, _backward)


def host_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
  """FLOPs of the oneDNN custom calls in a traced program, which XLA's cost analysis cannot see (to it a
  custom call is opaque). A call whose result nothing reads is left out, as XLA removes it."""
  read = {var for eqn in jaxpr.eqns for var in eqn.invars if isinstance(var, jax.extend.core.Var)}
  read.update(var for var in jaxpr.outvars if isinstance(var, jax.extend.core.Var))
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.params.get("target_name") in _TARGETS.values() and any(var in read for var in eqn.outvars):
      geometry = dict(eqn.params["attributes"])["geometry"]
      total += onednn.ConvolutionShape.from_geometry(np.asarray(getattr(geometry, "val", geometry))).flops
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += host_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += host_flops(sub)
  return total
