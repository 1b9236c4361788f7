"""Grain worker processes end with the training process that started them, however it ends.

Grain's workers are daemonic multiprocessing children: they stop when their parent exits normally,
but a parent killed with SIGKILL (an OOM kill, `kill -9`, a crashed host agent) leaves them running,
holding memory and file handles. Each worker therefore runs a watchdog thread that polls its parent
pid and exits when it changes (the orphan was re-parented). `prctl(PR_SET_PDEATHSIG)` is not used:
it fires when the *thread* that spawned the worker ends, and Grain spawns workers from its prefetch
threads, which may end while the worker is still needed.
"""

import functools
import os
import threading
import time
from collections.abc import Callable

_POLL_SECONDS = 0.5


def _exit_when_orphaned(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(_POLL_SECONDS)
  os._exit(1)  # pylint: disable=protected-access -- no cleanup: the parent's resource tracker frees shared memory


def _start_watchdog(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """Runs in the worker at start (Grain's worker_init_fn)."""
  del worker_index, worker_count
  if os.getppid() != parent_pid:  # the parent died before this worker got here
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="exit-with-parent", daemon=True).start()


def worker_init_fn() -> Callable[[int, int], None]:
  """A Grain `worker_init_fn` tying each worker's life to this (the calling) process."""
  return functools.partial(_start_watchdog, os.getpid())
