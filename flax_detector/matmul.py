"""Dense layers computed by oneDNN on CPU where model.library chooses it (flax_detector.compute_library).

On the 2-core CPU, jaxlib 0.10.2 multiplies VGG16's first Dense layer at 64 px (32 x 25088 by 25088 x 4096)
in 103 ms forward (YNNPACK) and its kernel gradient in 121-139 ms (Eigen); oneDNN's matmul takes 50 and
84 ms (benchmarks/RESULTS.md). Every float32 (batch x features) by (features x outputs) product, the form
flax.linen.Dense computes, goes to oneDNN as three custom calls (flax_detector.onednn_calls); anything else
stays with XLA. Results match XLA's to float32 rounding (tests/test_matmul.py).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax_detector import compute_library, onednn, onednn_calls

# forward (inputs, kernel), input gradient, kernel gradient: custom calls, differentiable as one function
_onednn_matmul = onednn_calls.operation("matmul", onednn.MatmulShape.from_geometry, onednn.matmul)
_DENSE_DIMENSIONS = (((1,), (0,)), ((), ()))


def dot_general_for(choice: str) -> Callable[..., jax.Array] | None:
  """The `dot_general` to give flax.linen.Dense for model.library: None (Flax's default, XLA) or oneDNN's."""
  return onednn_dot_general if compute_library.uses_onednn(choice) else None


def onednn_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers: Any,
  precision: Any = None,
  preferred_element_type: Any = None,
  **options: Any,
) -> jax.Array:
  """lax.dot_general's signature; oneDNN for a float32 2-D matmul, XLA for anything else."""
  dimensions = jax.tree.map(int, dimension_numbers)
  if (
    lhs.ndim == 2
    and rhs.ndim == 2
    and dimensions == jax.tree.map(int, _DENSE_DIMENSIONS)
    and lhs.dtype == rhs.dtype == jnp.float32
    and preferred_element_type in (None, jnp.float32)
    and not options
  ):
    return _onednn_matmul(lhs, rhs, onednn.MatmulShape(lhs.shape[0], lhs.shape[1], rhs.shape[1]))
  return jax.lax.dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **options
  )
