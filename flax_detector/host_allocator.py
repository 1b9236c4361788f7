"""Keeps the memory XLA:CPU frees mapped for its next use: each step otherwise faults in its buffers anew.

XLA:CPU allocates a compiled program's temporary buffer (68 MB for the `cpu` preset's train step, more for
larger models) and its outputs with malloc on every execution and frees them after. glibc serves requests
above 32 MB, and any request a thread's own arena cannot hold (64 MB), with a fresh mmap, and gives the
pages back with munmap on free. So every step faulted in and zeroed ~16,600 pages again: about 40 ms of
kernel time per step of the `cpu` preset, a step that takes 110 ms on 2 cores.

With every thread on glibc's main heap, no mmap for large requests and no trimming of its top, a freed
buffer is reused by the next step: 0 page faults per step, the train step 8-26% faster on a 2-core CPU
(benchmarks/RESULTS.md).
The cost is that memory the process frees stays reserved for it instead of going back to the OS, so its
resident size stays near its peak: the right trade for a process that trains, evaluates or predicts.
FLAX_DETECTOR_KEEP_FREED_MEMORY=0 in the environment turns it off.

It applies only where it helps: glibc on Linux (mallopt does not exist on macOS or musl), and only when
JAX will compute on the CPU (no accelerator plugin installed, or JAX_PLATFORMS=cpu), because one arena
for every thread could slow the many host threads of an accelerator job. Call it before JAX starts its
CPU backend: threads that already have an arena keep it.

Grain's worker processes (spawned, so they start with glibc's defaults) take the same settings whatever
computes the model: a worker only decodes and augments, on one thread, and each decoded image and its
copies (768 KiB for a 512-px RGB image) would otherwise come from fresh pages. A 512-px JPEG to a 224-px
training crop faulted in 75 pages (0.15-0.22 ms of kernel time) per image; with the settings, none
(benchmarks/RESULTS.md).
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int and glibc stores it as a size_t: -1 is SIZE_MAX, a top chunk no heap reaches. The largest
# positive int (2**31 - 1) still let glibc give back a top above 2 GB, which the full-width model reaches at 64 px
# with two steps' buffers alive (the loop dispatches a step before the last one ends): 0.3-0.9 GB faulted in again
# per step, the step 1.3-1.7x slower (benchmarks/RESULTS.md).
_NEVER_TRIM = -1
OPT_OUT_VARIABLE = "FLAX_DETECTOR_KEEP_FREED_MEMORY"


def jax_computes_on_cpu() -> bool:
  """Whether JAX will pick its CPU backend, decided without starting any backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return not plugins and importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def keep_freed_memory_mapped() -> bool:
  """Sets glibc's allocator as the module docstring explains, when JAX computes on the CPU; whether it did."""
  return jax_computes_on_cpu() and keep_freed_memory_mapped_while_decoding()


def keep_freed_memory_mapped_while_decoding() -> bool:
  """The same settings for a process that decodes images and runs no JAX (a Grain worker); whether it did."""
  if os.environ.get(OPT_OUT_VARIABLE) == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
