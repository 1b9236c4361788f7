"""Grain's shared-memory batches are released on the thread that drops them, never on a helper thread.

Grain's worker processes hand each batch to this process in POSIX shared memory, and
`SharedMemoryArray.__del__` normally passes the close and unlink to a helper thread. That is only
safe while batches die by reference counting. Grain leaves the last batch of every finite pass in
a reference cycle (the StopIteration that ends the pass keeps its prefetch thread's frame, which
holds the batch), so Python's cyclic collector frees it, and the collector also finalizes the
batch's `multiprocessing.shared_memory.SharedMemory`, whose own `__del__` closes the same file
descriptor while the helper thread closes it. `SharedMemory.close` is not thread-safe: both
threads can pass its `fd >= 0` check, and the second `close` then lands on whatever the number was
given next, for example the descriptor of the next batch's `shm_open` (the run failed with EBADF
in `os.fstat`), or a checkpoint or event file being written. strace counted 4 to 9 such double
closes in one resumed test run (`close(...) = -1 EBADF`); with the release synchronous, none.

Released on the dropping thread, both closes run one after the other and the second does nothing.
The cost is that thread's munmap and unlink: about 1 ms for a 128 x 224 x 224 x 3 uint8 batch.
"""

import grain.multiprocessing


def _stay_synchronous(cls: type, num_threads: int = 1, max_outstanding_requests: int = 50) -> None:
  """Replaces `SharedMemoryArray.enable_async_del`, which Grain calls each time it starts a worker."""
  del cls, num_threads, max_outstanding_requests


def release_on_the_dropping_thread() -> None:
  """Makes every Grain shared-memory batch of this process close and unlink when it is dropped (idempotent)."""
  array_type = grain.multiprocessing.SharedMemoryArray
  array_type.enable_async_del = classmethod(_stay_synchronous)
  array_type._disable_async_del()  # pylint: disable=protected-access -- Grain's own switch back to synchronous
