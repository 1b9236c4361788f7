"""Which library computes the model's convolutions: XLA's own, or oneDNN on CPU. Chosen at trace time.

`config.model.convolutions`:
  "xla":    lax.conv_general_dilated everywhere.
  "onednn": oneDNN (flax_detector.onednn) for every float32, stride-1, ungrouped NHWC convolution; an error
            where it cannot run (no libdnnl, not on CPU, several devices).
  "auto":   oneDNN where it can run, XLA otherwise: accelerators, multi-device meshes and bfloat16 get XLA,
            and a missing library only costs speed.

oneDNN runs as an XLA host callback with a custom VJP: the forward pass, the input gradient and the kernel
gradient are three separate calls, so XLA drops the ones nobody uses (the first layer's input gradient). A
callback sees the whole array of the device it runs on, hence the one-device condition: on a mesh of several
devices XLA would gather every activation onto one of them. Results match XLA's convolution to float32
rounding and are bitwise repeatable run to run on the same machine and thread count
(tests/test_convolution.py). Costs: XLA copies each operand and result of a callback once, and JAX does
not store a program with host callbacks in its persistent compilation cache, so each run compiles its steps.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax._src import callback as jax_callback
from jax.interpreters import mlir

from flax_detector import onednn

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
  dimension_numbers = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, dimension_numbers)
  plain = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, _NHWC_HWIO)
  if (
    dimension_numbers != plain
    or inputs.ndim != 4
    or inputs.dtype != jnp.float32
    or kernel.dtype != jnp.float32
    or feature_group_count != 1
    or any(stride != 1 for stride in window_strides)
    or any(d != 1 for d in (lhs_dilation or ()))
    or any(d != 1 for d in (rhs_dilation or ()))
    or isinstance(padding, str)
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


def _result_shape(shape: onednn.ConvolutionShape, piece: str) -> tuple[int, ...]:
  return {
    "forward": (shape.batch, shape.output_height, shape.output_width, shape.out_channels),
    "input_gradient": (shape.batch, shape.height, shape.width, shape.in_channels),
    "kernel_gradient": (shape.kernel_height, shape.kernel_width, shape.in_channels, shape.out_channels),
  }[piece]


def _host_call(first: np.ndarray, second: np.ndarray, *, shape: onednn.ConvolutionShape, piece: str) -> np.ndarray:
  return getattr(onednn.convolution(shape), piece)(first, second)


# One piece of a oneDNN convolution (params: shape, piece = "forward", "input_gradient" or "kernel_gradient") as
# its own primitive rather than a jax.pure_callback: pure_callback hands its function jax.Arrays (a device_put
# of every operand, then a copy back out to numpy), about 0.3 ms per call and 1 ms for a 4 MB activation.
# The primitive lowers to the same XLA host callback with numpy views of XLA's buffers, and `host_flops` can
# read its shape from a traced program.
onednn_convolution_p = jax.extend.core.Primitive("onednn_convolution")
onednn_convolution_p.def_abstract_eval(
  lambda first, second, *, shape, piece: jax.core.ShapedArray(_result_shape(shape, piece), jnp.float32)
)
onednn_convolution_p.def_impl(
  lambda first, second, *, shape, piece: jnp.asarray(
    _host_call(np.asarray(first), np.asarray(second), shape=shape, piece=piece)
  )
)


def _lower_on_cpu(ctx: Any, first: Any, second: Any, *, shape: onednn.ConvolutionShape, piece: str) -> Any:
  # jax._src.callback.emit_python_callback is what jax.pure_callback lowers to (jax 0.10.2); it is internal,
  # hence the pinned JAX version (shared/JAX_STACK_NOTES.md).
  results, _, _ = jax_callback.emit_python_callback(
    ctx,
    lambda first, second: (_host_call(first, second, shape=shape, piece=piece),),
    None,
    [first, second],
    ctx.avals_in,
    ctx.avals_out,
    has_side_effect=False,
    returns_token=False,
  )
  return results


# Not cacheable: each lowering registers its host callback with the module being built, as pure_callback's does.
mlir.register_lowering(onednn_convolution_p, _lower_on_cpu, platform="cpu", cacheable=False)


def _piece(piece: str, shape: onednn.ConvolutionShape, first: jax.Array, second: jax.Array) -> jax.Array:
  return onednn_convolution_p.bind(first, second, shape=shape, piece=piece)


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
  """FLOPs of the oneDNN callbacks in a traced program, which XLA's cost analysis cannot see (to it a
  callback is an opaque call). A callback whose result nothing reads is left out, as XLA removes it."""
  read = {var for eqn in jaxpr.eqns for var in eqn.invars if isinstance(var, jax.extend.core.Var)}
  read.update(var for var in jaxpr.outvars if isinstance(var, jax.extend.core.Var))
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive is onednn_convolution_p and any(var in read for var in eqn.outvars):
      total += eqn.params["shape"].flops
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += host_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += host_flops(sub)
  return total
