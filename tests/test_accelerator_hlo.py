"""benchmarks/accelerator_hlo.py: the bytes each op of a compiled program moves, read from its HLO text.

Compiling for a GPU or TPU needs JAX's plugin for it (the cuda and tpu extras); the HLO text it reads has
the same syntax on every backend, so the accounting is checked here on a program compiled for this CPU.
"""

import jax
import jax.numpy as jnp
import pytest
from absl import app

from benchmarks import accelerator_hlo


def test_each_op_moves_its_operands_and_results_and_matmuls_are_counted_apart():
  a, b = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 32), jnp.float32)
  program = jax.jit(lambda a, b: (jnp.tanh(a @ b).astype(jnp.bfloat16), (a * 2).sum(axis=0))).lower(a, b).compile()
  ops = {op.source.rsplit("/", 1)[-1]: op for op in accelerator_hlo.op_traffic(program.as_text())}
  product = 64 * 32 * 4
  assert ops["dot_general"].computes
  assert ops["dot_general"].bytes == a.nbytes + b.nbytes + product
  assert not ops["reduce_sum"].computes
  assert ops["reduce_sum"].bytes == a.nbytes + 128 * 4
  assert not ops["convert_element_type"].computes  # tanh and the cast: the product in, bfloat16 out
  assert ops["convert_element_type"].bytes == product + 64 * 32 * 2
  lines = accelerator_hlo.summary_lines(list(ops.values()), bytes_per_second=1e9, top=1)
  passes = ops["reduce_sum"].bytes + ops["convert_element_type"].bytes
  assert f"the other 2 ops {passes / 1e9:.2f} GB, at least {passes / 1e6:.2f} ms" in lines[0]


def test_array_bytes_of_tuples_and_layouts():
  assert accelerator_hlo.array_bytes("(bf16[8,4]{1,0}, s32[8]{0}, pred[3])") == 8 * 4 * 2 + 8 * 4 + 3
  assert accelerator_hlo.array_bytes("f32[2,3]{1,0:T(8,128)S(1)}") == 24  # TPU tiling and memory space
  assert accelerator_hlo.array_bytes("s8[]") == 1


def test_an_unknown_target_names_the_choices():
  with pytest.raises(app.UsageError, match="neither .*a100.txtpb nor a TPU topology"):
    accelerator_hlo.target_devices("a100")
