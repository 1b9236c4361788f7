"""A oneDNN operation inside a jitted program: three XLA custom calls under one custom VJP.

Convolutions (flax_detector.convolution) and Dense layers (flax_detector.matmul) have the same three pieces:
the forward pass (inputs, kernel), the input gradient (output gradient, kernel) and the kernel gradient
(inputs, output gradient). Each is its own custom call, so XLA drops the ones nobody uses (the first
layer's input gradient). oneDNN reads and writes XLA's buffers in place (flax_detector.xla_ffi): nothing is
copied, and the compiled program goes to the persistent compilation cache like any other.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from flax_detector import xla_ffi

PIECES = ("forward", "input_gradient", "kernel_gradient")

# FLOPs of each registered target from its `geometry` attribute, for `host_flops`.
_FLOPS_BY_TARGET: dict[str, Callable[[np.ndarray], int]] = {}


class Shape(Protocol):
  """What an operation's shape class (onednn.ConvolutionShape, onednn.MatmulShape) provides."""

  @property
  def geometry(self) -> np.ndarray: ...

  @property
  def flops(self) -> int: ...

  def result_shape(self, piece: str) -> tuple[int, ...]: ...


class Primitives(Protocol):
  def run(self, piece: str, first: int, second: int, result: int) -> None: ...


def count_flops(target: str, from_geometry: Callable[[Sequence[int]], Shape]) -> None:
  """Makes `host_flops` count a call of `target` as the FLOPs of the shape its `geometry` attribute holds."""
  _FLOPS_BY_TARGET[target] = lambda geometry: from_geometry(geometry).flops


def by_geometry(from_geometry: Callable[..., Any], primitives: Callable[[Any], Any]) -> Callable[..., Any]:
  """primitives(from_geometry(*attributes)), cached by a custom call's attribute values (its geometry tuple,
  and any others the shape needs): once the primitives exist, a handler finds them with one dict lookup
  instead of building and hashing a shape on every call."""
  return functools.cache(lambda *attributes: primitives(from_geometry(*attributes)))


def operation(
  name: str, from_geometry: Callable[[Sequence[int]], Any], primitives: Callable[[Any], Primitives]
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
  """f(inputs, kernel, shape), differentiable in inputs and kernel, computed by `primitives(shape).run`.

  `shape` is hashable and static; it travels to the custom calls as their int64 `geometry` attribute, and
  `from_geometry` reads it back there. Targets are named flax_detector_onednn_{name}_{piece}.
  """
  targets = {piece: f"flax_detector_onednn_{name}_{piece}" for piece in PIECES}
  for target in targets.values():
    count_flops(target, from_geometry)

  primitives_for = by_geometry(from_geometry, primitives)

  def handler(piece: str) -> xla_ffi.HandlerFunction:
    def run(operands: Sequence[int], results: Sequence[int], attributes: dict[str, tuple[int, ...]]) -> None:
      primitives_for(attributes["geometry"]).run(piece, operands[0], operands[1], results[0])

    return run

  @functools.cache
  def register_targets() -> None:
    for piece, target in targets.items():
      xla_ffi.register_cpu_target(target, handler(piece))

  def call(piece: str, shape: Shape, first: jax.Array, second: jax.Array) -> jax.Array:
    register_targets()
    result = jax.ShapeDtypeStruct(shape.result_shape(piece), jnp.float32)
    return jax.ffi.ffi_call(targets[piece], result)(first, second, geometry=shape.geometry)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def apply(inputs: jax.Array, kernel: jax.Array, shape: Shape) -> jax.Array:
    return call("forward", shape, inputs, kernel)

  def forward(inputs: jax.Array, kernel: jax.Array, shape: Shape) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return apply(inputs, kernel, shape), (inputs, kernel)

  def backward(
    shape: Shape, residuals: tuple[jax.Array, jax.Array], output_gradient: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    inputs, kernel = residuals
    input_gradient = call("input_gradient", shape, output_gradient, kernel)
    kernel_gradient = call("kernel_gradient", shape, inputs, output_gradient)
    return input_gradient, kernel_gradient

  apply.defvjp(forward, backward)
  return apply


def host_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
  """FLOPs of the oneDNN custom calls in a traced program, which XLA's cost analysis cannot see (to it a
  custom call is opaque). A call whose result nothing reads is left out, as XLA removes it."""
  read = {var for eqn in jaxpr.eqns for var in eqn.invars if isinstance(var, jax.extend.core.Var)}
  read.update(var for var in jaxpr.outvars if isinstance(var, jax.extend.core.Var))
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.params.get("target_name") in _FLOPS_BY_TARGET and any(var in read for var in eqn.outvars):
      geometry = dict(eqn.params["attributes"])["geometry"]
      total += _FLOPS_BY_TARGET[eqn.params["target_name"]](np.asarray(getattr(geometry, "val", geometry)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += host_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += host_flops(sub)
  return total
