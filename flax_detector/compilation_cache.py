"""Compiled XLA programs stay on disk between runs, so a resumed or repeated run does not compile them again.

A run compiles its parameter initialization, train step and evaluation before using them: 18 s of a
54 s, 40-step `cpu`-preset run on a 2-core CPU, and more for full VGG16 on an accelerator. A run
resumed after a preemption, the same command run again, and `evaluate` or `predict` on a trained run
compile the same programs. JAX's persistent compilation cache keeps them (programs that took at least
a second to compile) in ~/.cache/flax_detector/jax (under $XDG_CACHE_HOME when set), evicting the least
recently used beyond 4 GiB. A program read back is the one compiled, so results are bitwise the same.
JAX_COMPILATION_CACHE_DIR, when set, wins: a shared folder, or empty to turn the cache off.
"""

import importlib.util
import os
import pathlib

import jax

MAX_BYTES = 4 * 2**30


def default_dir() -> pathlib.Path:
  cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache_home) / "flax_detector" / "jax"


def keep_compiled_programs() -> None:
  """Turns JAX's persistent compilation cache on in default_dir(), unless JAX_COMPILATION_CACHE_DIR says otherwise.

  Call it before the first compilation.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  jax.config.update("jax_compilation_cache_dir", str(default_dir()))
  # Eviction needs filelock (a dependency), and JAX raises at the first compilation without it; an
  # install made with --no-deps (the GPU image's, ../shared/gpu) then keeps every program instead.
  if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
