"""Python FFI handlers (flax_detector.xla_ffi): XLA calls them on its own buffers, and their errors reach JAX."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import xla_ffi


def _floats(address: int, size: int) -> np.ndarray:
  return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)), (size,))


def test_a_handler_reads_and_writes_xla_buffers_in_place_with_its_array_attributes():
  def add_offset(operands, results, attributes):
    size = int(attributes["size"][0])
    _floats(results[0], size)[:] = _floats(operands[0], size) + attributes["offset"][0]

  xla_ffi.register_cpu_target("flax_detector_test_add_offset", add_offset)
  xla_ffi.register_cpu_target("flax_detector_test_add_offset", add_offset)  # registering again is a no-op
  call = jax.ffi.ffi_call("flax_detector_test_add_offset", jax.ShapeDtypeStruct((5,), jnp.float32))
  inputs = jnp.arange(5.0)
  result = jax.jit(lambda x: call(x, size=np.array([5], np.int64), offset=np.array([3], np.int64)))(inputs)
  np.testing.assert_array_equal(result, inputs + 3)


def test_an_exception_in_a_handler_becomes_a_jax_error_naming_the_target():
  def fail(operands, results, attributes):
    raise ValueError("no such geometry")

  xla_ffi.register_cpu_target("flax_detector_test_fail", fail)
  call = jax.ffi.ffi_call("flax_detector_test_fail", jax.ShapeDtypeStruct((2,), jnp.float32))
  with pytest.raises(jax.errors.JaxRuntimeError, match="flax_detector_test_fail: ValueError: no such geometry"):
    jax.block_until_ready(jax.jit(call)(jnp.ones(2)))
