"""What this host can give the input pipeline: the cores this process may use, and free memory.

data.worker_count=-1 asks for a worker count chosen from the host: one Grain worker per core that this
process may run on (its CPU affinity, which taskset, Slurm's --cpus-per-task and container limits narrow),
less the cores the training process itself needs.
"""

import os

# Cores left to the training process: its Python loop, the host-to-device copies and the runtime's threads.
TRAINING_PROCESS_CORES = 2
# Each worker is a process holding its own interpreter and imports; past this many, more of them only add
# memory and start-up time (a 512-px JPEG decodes and augments in a few milliseconds per core).
MAX_AUTO_WORKERS = 32


def usable_cores() -> int:
  """The cores this process may run on: its affinity mask where the OS has one, else every core."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS and Windows have no affinity masks
    return os.cpu_count() or 1


def auto_worker_count(cores: int | None = None) -> int:
  """Grain workers for data.worker_count=-1: every usable core but the training process's, at least 1."""
  cores = usable_cores() if cores is None else cores
  return max(1, min(MAX_AUTO_WORKERS, cores - TRAINING_PROCESS_CORES))


def available_memory_bytes() -> int | None:
  """Memory the kernel could hand out now without swapping (MemAvailable), or None where unknown (not Linux)."""
  try:
    with open("/proc/meminfo") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None
