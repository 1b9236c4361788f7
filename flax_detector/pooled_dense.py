"""The classifier's entrance: torch's AdaptiveAvgPool2d to a fixed side, flattened, then a Dense layer.

Below 224 px VGG16's last feature map is smaller than the pool's 7x7 output (2x2 at 64 px), and the pool
only replicates and averages its few cells: 25,088 Dense inputs carry 2,048 numbers. The pool is linear,
so Dense(pool(x)) = x @ (P^T W): the kernel's 49 row blocks summed, each with its pooling weight, into one
block per input cell. `PooledDense` computes that when the input has fewer cells than the output: the
kernel is read once (a matmul of 4x49 by 49x(C*N), memory-bound) instead of multiplied by a batch of
mostly repeated rows, and its gradient is that contraction's transpose. Full-width VGG16 at 64 px: the
first Dense layer's forward and both gradients take about 60 ms instead of 150-190 on a 2-core CPU
(benchmarks/RESULTS.md). The parameters are nn.Dense's (same names, shapes and initialisation), so
checkpoints and torchvision weights load either way; results agree to float rounding (tests/test_pooled_dense.py).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def adaptive_pool_matrix(size: int, output_side: int) -> np.ndarray:
  """float32[output_side, size]: row i averages torch's bin i, [floor(i*size/out), ceil((i+1)*size/out))."""
  matrix = np.zeros((output_side, size), np.float32)
  for i in range(output_side):
    start, end = (i * size) // output_side, -((-(i + 1) * size) // output_side)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jnp.ndarray, output_side: int) -> jnp.ndarray:
  """torch.nn.AdaptiveAvgPool2d on NHWC, exact for any input side, including inputs smaller than the
  output (64-px crops reach it at 2x2 and are replicated, like torch)."""
  height, width = x.shape[1:3]
  if (height, width) == (output_side, output_side):
    return x
  rows = jnp.asarray(adaptive_pool_matrix(height, output_side), x.dtype)
  cols = jnp.asarray(adaptive_pool_matrix(width, output_side), x.dtype)
  return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols)


class PooledDense(nn.Module):
  """nn.Dense(features) of adaptive_avg_pool(x, output_side) flattened, for NHWC x.

  Its kernel is float32[output_side**2 * channels, features] in the pooled map's (row, column, channel)
  order, as nn.Dense's would be; `dot_general` is nn.Dense's hook (flax_detector.matmul).
  """

  features: int
  output_side: int
  kernel_init: Callable[..., jax.Array]
  dtype: Any = jnp.float32
  dot_general: Callable[..., jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, height, width, channels = x.shape
    cells = self.output_side * self.output_side
    kernel = self.param("kernel", self.kernel_init, (cells * channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    dot_general = self.dot_general or jax.lax.dot_general
    if height * width < cells:
      # P[(i, j), (h, w)]: how much input cell (h, w) weighs in pooled cell (i, j). Folded in float32, before
      # the cast to the compute dtype: one read of the kernel, and no bfloat16 rounding of the sums.
      pooling = np.kron(adaptive_pool_matrix(height, self.output_side), adaptive_pool_matrix(width, self.output_side))
      blocks = kernel.reshape(cells, channels * self.features)
      kernel = _matmul(dot_general, jnp.asarray(pooling.T), blocks).reshape(height * width * channels, self.features)
    else:
      x = adaptive_avg_pool(x, self.output_side)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return _matmul(dot_general, x.reshape(batch, -1), kernel) + bias


def _matmul(dot_general: Callable[..., jax.Array], a: jax.Array, b: jax.Array) -> jax.Array:
  return dot_general(a, b, (((1,), (0,)), ((), ())))
