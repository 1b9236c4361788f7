"""Grain's shared-memory batches: each closed exactly once, and none left behind by a finished pass.

Grain's worker processes hand each batch to this process in POSIX shared memory. When a batch is
dropped, `SharedMemoryArray.__del__` passes its `multiprocessing.shared_memory.SharedMemory` to a
helper thread that closes and unlinks it, and the `SharedMemory`'s own `__del__` closes it again
when it dies. One after the other the second close does nothing; at the same time they race, since
`SharedMemory.close` is not thread-safe (both threads pass its `fd >= 0` check). They run at the
same time when the batch dies in Python's cyclic collector, which finalizes every object of a cycle
at once, and Grain leaves the last batch of every finite pass in a cycle (the StopIteration that
ends the pass keeps its prefetch thread's frame, which holds the batch). The losing close lands on
whatever the descriptor number was given next: the next batch's `shm_open` (a training test failed
with EBADF in `os.fstat`), or a checkpoint or event file being written. strace counted 4 to 9
`close(...) = -1 EBADF` in one resumed test run.

So the helper thread only unlinks (by name, which is safe beside a close), and the close is left to
the finalizer, which Python runs once per object: when the helper drops its reference (still off the
thread that dropped the batch), or in the collector. Releasing everything synchronously instead
would also be safe, but costs the dropping thread ~4.5 ms per 128 x 224 x 224 x 3 uint8 batch.
"""

import gc
from multiprocessing import shared_memory

import grain.multiprocessing


def _unlink_and_leave_the_close_to_the_finalizer(cls: type, shm: shared_memory.SharedMemory, unlink: bool) -> None:
  """Replaces `SharedMemoryArray.close_shm_async`, the task Grain's helper thread runs for a dropped batch."""
  if unlink:
    shm.unlink()
  cls._outstanding_del_requests.release()  # pylint: disable=protected-access -- as Grain's own task does


def close_each_batch_once() -> None:
  """Makes Grain's helper thread stop closing the batches it releases, in this process (idempotent)."""
  grain.multiprocessing.SharedMemoryArray.close_shm_async = classmethod(_unlink_and_leave_the_close_to_the_finalizer)


def release_finished_passes() -> None:
  """Frees, now, the batches a finished Grain pass left in a reference cycle (see the module docstring).

  Until a full collection finds it, such a batch keeps its shared memory: the size of one batch (for an
  evaluation, views x batch x crop), and at exit multiprocessing's resource tracker unlinks it with a
  warning of "leaked shared_memory objects". Call it after closing an iterator whose passes ended.
  """
  gc.collect()
