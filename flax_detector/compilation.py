"""What the commands set before JAX compiles anything: compiled programs kept between runs, and cheaper CPU codegen.

**Kept between runs.** A run compiles its parameter initialization, train step and evaluation before
using them: a 40-step `cpu`-preset run on a 2-core CPU takes 45.7 s with an empty cache, 36.6 s when run
again (54.2 and 36.2 s before the -O2 below), and full VGG16 on an accelerator compiles longer. A run
resumed after a preemption, the same command run again, and `evaluate` or `predict` on a trained run
compile the same programs. JAX's persistent compilation cache keeps them (programs that took at least a
second to compile) in ~/.cache/flax_detector/jax (under $XDG_CACHE_HOME when set),
evicting the least recently used beyond 4 GiB. A program read back is the one compiled, so results are
bitwise the same. JAX_COMPILATION_CACHE_DIR, when set, wins: a shared folder, or empty to turn it off.

**LLVM -O2 for XLA's CPU code.** On a CPU, the convolutions and matmuls run in YNNPACK's precompiled
kernels; LLVM compiles only XLA's own fusions (BatchNorm, activations, pooling, the optimizer), which
run as fast at -O2 as at XLA's default -O3 (the `cpu` preset's train step: 251.7 vs 252.7 images/s,
interleaved rounds) and give bitwise the same numbers (its parameters after init and after 3 steps, and
the golden digest), while compiling much faster: parameter initialization 1.9 s instead of 6.3 s, the
train step 3.5 s instead of 5.1 s (benchmarks/RESULTS.md). An --xla_backend_optimization_level in
XLA_FLAGS wins.
"""

import importlib.util
import os
import pathlib

import jax
from absl import logging

from flax_detector import host_allocator

MAX_CACHE_BYTES = 4 * 2**30
CPU_OPTIMIZATION_LEVEL = 2
_LEVEL_FLAG = "--xla_backend_optimization_level"


def default_cache_dir() -> pathlib.Path:
  cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache_home) / "flax_detector" / "jax"


def keep_compiled_programs() -> None:
  """Turns JAX's persistent compilation cache on in default_cache_dir(), unless JAX_COMPILATION_CACHE_DIR is set.

  Call it before the first compilation.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  directory = default_cache_dir()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # else JAX warns at every compilation that it cannot read the cache
    logging.warning(
      "Compiled programs are not kept between runs: cannot create %s (%s). Set JAX_COMPILATION_CACHE_DIR to a "
      "writable folder, or to nothing to silence this.",
      directory,
      error,
    )
    return
  jax.config.update("jax_compilation_cache_dir", str(directory))
  # Eviction needs filelock (a dependency), and JAX raises at the first compilation without it; an
  # install made with --no-deps (the GPU image's, ../shared/gpu) then keeps every program instead.
  if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)


def generate_cpu_code_at_o2() -> bool:
  """Adds the -O2 level to XLA_FLAGS when JAX computes on the CPU and no level is set; whether it did.

  Call it before JAX starts its backend, which reads XLA_FLAGS once.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _LEVEL_FLAG in flags or not host_allocator.jax_computes_on_cpu():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {_LEVEL_FLAG}={CPU_OPTIMIZATION_LEVEL}".strip()
  return True
