"""host_allocator: freed memory is reused instead of being faulted in again, by XLA:CPU and by Grain's workers."""

import io
import json
import os
import platform
import resource
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from flax_detector import host_allocator, input_pipeline
from flax_detector.data.decode import decode_image

# Runs in a fresh process (the allocator settings are process-wide and must precede JAX's CPU backend): a
# jitted program whose 80 MB output is freed after each call, and the fewest page faults of one call once
# warm. The runtime frees an output a call or more late, later under load, so some calls still grow the
# heap; the fewest shows whether a freed buffer is ever reused (glibc's defaults never reuse it).
_FAULTS_PER_CALL = """
import json, resource, sys
from flax_detector import host_allocator
applied = host_allocator.keep_freed_memory_mapped() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp
add_one = jax.jit(lambda x: x + 1)
x = jnp.zeros(20_000_000, jnp.float32)
for _ in range(10):  # the runtime frees an output a few calls late: reach the steady state first
  add_one(x).block_until_ready()
faults = []
for _ in range(10):
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  add_one(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({"applied": applied, "fewest_faults_in_a_call": min(faults)}))
"""


def _in_a_fresh_process(script: str, mode: str) -> dict:
  """Runs `script` with glibc's defaults ("default") or the settings ("tuned"); the JSON line it prints."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run(
    [sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, timeout=120, check=True
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_output_is_reused_instead_of_faulted_in_again():
  default, tuned = _in_a_fresh_process(_FAULTS_PER_CALL, "default"), _in_a_fresh_process(_FAULTS_PER_CALL, "tuned")
  assert tuned["applied"]
  # 80 MB is 19,531 pages: glibc's default maps and unmaps them on every call.
  assert default["fewest_faults_in_a_call"] > 15_000
  assert tuned["fewest_faults_in_a_call"] < 500


# Also a fresh process: a heap whose free top exceeds 2**31 - 1 bytes (the largest positive int mallopt takes),
# as two in-flight steps of full-width VGG16 at 64 px leave it, filled, freed and filled again.
_FAULTS_REFILLING_A_LARGE_TOP = """
import ctypes, json, resource, sys
from flax_detector import host_allocator
applied = host_allocator.keep_freed_memory_mapped_while_decoding() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 2_300_000_000
def fill_and_free():
  address = libc.malloc(size)
  ctypes.memset(address, 1, size)
  libc.free(address)
fill_and_free()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill_and_free()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_heap_top_above_two_gigabytes_stays_mapped():
  default = _in_a_fresh_process(_FAULTS_REFILLING_A_LARGE_TOP, "default")
  tuned = _in_a_fresh_process(_FAULTS_REFILLING_A_LARGE_TOP, "tuned")
  assert tuned["applied"]
  # 2.3 GB is 561,524 pages: glibc's defaults map and unmap them, a trimmed top faults them all in again.
  assert default["faults"] > 500_000, default
  assert tuned["faults"] < 1_000, tuned


def test_it_applies_only_when_jax_computes_on_the_cpu_and_can_be_turned_off(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_allocator.jax_computes_on_cpu()
  assert not host_allocator.keep_freed_memory_mapped()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_allocator.jax_computes_on_cpu()
  monkeypatch.setenv(host_allocator.OPT_OUT_VARIABLE, "0")
  assert not host_allocator.keep_freed_memory_mapped()


def _page_faults_of_decoding(_: int) -> int:
  """Runs in a Grain worker: page faults of decoding batches of 32 512-px JPEGs, as a training batch holds them
  (every image alive until the batch is stacked, then all freed at once), once warm."""
  encoded = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)).save(encoded, format="JPEG")

  def batch() -> None:
    np.stack([decode_image(encoded.getvalue(), "image.jpg") for _ in range(32)])

  batch()
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    batch()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def _faults_in_a_worker() -> int:
  dataset = grain.MapDataset.range(1).map(_page_faults_of_decoding)
  iterator = input_pipeline.make_iterator(dataset, worker_count=1, worker_buffer_size=1)
  try:
    return int(next(iterator))
  finally:
    iterator.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_grain_workers_decode_without_faulting_in_fresh_pages(monkeypatch):
  """Workers are spawned with glibc's defaults; input_pipeline's worker_init_fn applies the settings there,
  whatever computes the model (the opt-out variable, which workers inherit, shows the default)."""
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # an accelerator job's workers too
  tuned = _faults_in_a_worker()
  monkeypatch.setenv(host_allocator.OPT_OUT_VARIABLE, "0")
  default = _faults_in_a_worker()
  assert default > 5_000, default  # each batch maps and faults in fresh pages (about 20,000 here)
  assert tuned < 20, tuned
