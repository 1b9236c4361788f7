"""host_allocator: a freed XLA:CPU buffer is reused by the next execution instead of being faulted in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

from flax_detector import host_allocator

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


def _faults_per_call(mode: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run(
    [sys.executable, "-c", _FAULTS_PER_CALL, mode], capture_output=True, text=True, env=env, timeout=120, check=True
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_output_is_reused_instead_of_faulted_in_again():
  default, tuned = _faults_per_call("default"), _faults_per_call("tuned")
  assert tuned["applied"]
  # 80 MB is 19,531 pages: glibc's default maps and unmaps them on every call.
  assert default["fewest_faults_in_a_call"] > 15_000
  assert tuned["fewest_faults_in_a_call"] < 500


def test_it_applies_only_when_jax_computes_on_the_cpu_and_can_be_turned_off(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_allocator.jax_computes_on_cpu()
  assert not host_allocator.keep_freed_memory_mapped()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_allocator.jax_computes_on_cpu()
  monkeypatch.setenv(host_allocator.OPT_OUT_VARIABLE, "0")
  assert not host_allocator.keep_freed_memory_mapped()
