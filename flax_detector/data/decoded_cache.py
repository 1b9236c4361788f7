"""data.cache_decoded: a source's images decoded once, in one memory-mapped file every Grain worker shares.

Decoding costs milliseconds per image, every epoch. A data set that fits in memory (the 22k-image public
set) can be decoded once instead; but a cache inside each Grain worker would be filled once per worker,
because the shuffle sends every record to a different worker each epoch. So the training process decodes
every record up front (threads: Pillow decodes without the GIL), appends the pixels to one flat uint8 file,
and the workers map that file read-only: the kernel's page cache holds a single copy for all of them.

Every process of a multi-host job reads all of its training split over the epochs (its share of each
global batch is drawn from the whole shuffled split), so each process caches the whole split it loaded;
several processes on one host each hold their own copy, and each checks the free memory only for itself.

The file is written in /dev/shm (memory) or, where that is too small, the run's workdir, and unlinked as
soon as it exists: the training process keeps it open and the workers open it through /proc/<pid>/fd, so
nothing is left behind however the run ends. Only decoding moves; the crops, flips, blur and JPEG
re-compression stay in the workers after it, so a seed gives the same batches with or without the cache.
"""

import concurrent.futures
import os
import tempfile
import time
import weakref

import numpy as np
from absl import logging

from flax_detector import preprocess
from flax_detector.data import host_resources
from flax_detector.data.decode import UnreadableImageError
from flax_detector.data.sources import ImageSource

# Memory the cache leaves to the training process, its workers and their batches: a quarter of what is free.
_KEPT_FREE = 0.25
# data.cache_decoded="auto" caches only a split whose decoded pixels take at most this share of free memory.
_AUTO_SHARE = 0.25
_SHM = "/dev/shm"


def decoded_bytes(sizes: np.ndarray, shorter_side: int | None) -> np.ndarray:
  """Bytes of every decoded RGB image of (height, width) `sizes`, scaled as `shorter_side` asks."""
  if shorter_side is not None:
    sizes = np.array([preprocess.resized_shape(int(h), int(w), shorter_side) for h, w in sizes]).reshape(-1, 2)
  return np.asarray(sizes, np.int64).prod(axis=1) * 3


def _mib(size: int) -> str:
  return f"{size / 2**20:,.0f} MiB"


def _free_bytes(folder: str) -> int:
  stats = os.statvfs(folder)
  return stats.f_bavail * stats.f_frsize


def _candidate_folders(workdir: str | None) -> list[str]:
  return [folder for folder in (_SHM, workdir or tempfile.gettempdir()) if os.path.isdir(folder)]


def fits_easily(source: ImageSource, shorter_side: int | None, workdir: str | None) -> tuple[bool, str]:
  """For data.cache_decoded="auto": whether to cache, and why. Only when the decoded split is known to take
  at most a quarter of the available memory and a folder has room, so "auto" never stops a run that would
  otherwise start (True insists, and refuses what does not fit)."""
  if source.sizes is None:
    return False, "the source records no image sizes"
  need = int(decoded_bytes(source.sizes, shorter_side).sum())
  available = host_resources.available_memory_bytes()
  if available is None or need > available * _AUTO_SHARE:
    memory = "unknown" if available is None else _mib(available)
    return False, f"the decoded images need {_mib(need)}, more than {_AUTO_SHARE:.0%} of the available {memory}"
  if not any(_free_bytes(folder) >= need for folder in _candidate_folders(workdir)):
    return False, f"no cache folder has {_mib(need)} free"
  return True, f"the decoded images need {_mib(need)} of the available {_mib(available)}"


def _choose_folder(need: int, workdir: str | None) -> str:
  """/dev/shm when it can hold `need` bytes, else the workdir (its pages stay in the page cache while they fit).

  Raises ValueError naming data.cache_decoded when the host's free memory cannot hold the images.
  """
  available = host_resources.available_memory_bytes()
  budget = None if available is None else int(available * (1 - _KEPT_FREE))
  folders = _candidate_folders(workdir)
  fitting = [folder for folder in folders if _free_bytes(folder) >= need]
  if (budget is None or need <= budget) and fitting:
    return fitting[0]
  free = ", ".join(f"{folder} has {_mib(_free_bytes(folder))} free" for folder in folders)
  memory = "unknown" if available is None else f"{_mib(available)} ({_KEPT_FREE:.0%} of it kept for training)"
  raise ValueError(
    f"data.cache_decoded=True: the decoded training images need {_mib(need)}, but this host's "
    f"available memory is {memory} and {free}; set --config.data.cache_decoded=False (images are then "
    "decoded in the Grain workers every epoch) or free memory"
  )


def _open_unlinked(folder: str) -> tuple[int, str]:
  """A new file's descriptor, and the path other processes open it by: /proc/<pid>/fd/<fd> once unlinked."""
  fd, path = tempfile.mkstemp(prefix="flax_detector-decoded-", suffix=".u8", dir=folder)
  shared = f"/proc/{os.getpid()}/fd/{fd}"
  if os.path.exists(shared):
    os.unlink(path)
    return fd, shared
  return fd, path  # no /proc (macOS): the path stays until the cache is released


def _release(fd: int, path: str) -> None:
  os.close(fd)
  if not path.startswith("/proc/") and os.path.exists(path):
    os.unlink(path)


class DecodedCache:
  """An ImageSource whose images were decoded once into a shared memory-mapped file; picklable for workers.

  Each record's image is decoded as the pipeline asks for it, `source.image(i, shorter_side)`: native pixels,
  or already scaled under data.preprocess="resize". A record that could not be decoded raises the same
  UnreadableImageError on every access, so the pipeline's read_or_skip warns and masks it exactly as it does
  without the cache.
  """

  def __init__(self, source: ImageSource, shorter_side: int | None, workdir: str | None = None):
    if source.sizes is None:
      raise ValueError(
        "data.cache_decoded=True: this prepared data.dir records no image sizes, so the memory the cache "
        "needs is unknown; re-run flax_detector.prepare --overwrite, or set --config.data.cache_decoded=False"
      )
    self.labels, self.keys, self.sizes = source.labels, source.keys, source.sizes
    self.shorter_side = shorter_side
    need = int(decoded_bytes(source.sizes, shorter_side).sum())
    folder = _choose_folder(need, workdir)
    self._fd, self._path = _open_unlinked(folder)
    self._finalizer = weakref.finalize(self, _release, self._fd, self._path)
    start = time.perf_counter()
    self._offsets, self._shapes, self._errors = self._fill(source)
    logging.info(
      "data.cache_decoded: %d images decoded once into %s in %s (%.1f s); %d unreadable, masked when drawn",
      len(source),
      _mib(self._offsets[-1]),
      folder,
      time.perf_counter() - start,
      len(self._errors),
    )
    self._pixels: np.ndarray | None = None

  def _fill(self, source: ImageSource) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decodes every record in threads, in order, appending its pixels to the file; a bounded number in flight."""
    offsets = np.zeros(len(source) + 1, np.int64)
    shapes = np.zeros((len(source), 2), np.int64)
    errors: dict[int, str] = {}

    def decode(index: int) -> np.ndarray | UnreadableImageError:
      try:
        return source.image(index, self.shorter_side)
      except UnreadableImageError as error:  # kept, and raised again on every access (see image)
        return error

    threads = host_resources.usable_cores()
    with (
      concurrent.futures.ThreadPoolExecutor(threads) as pool,
      os.fdopen(self._fd, "wb", closefd=False) as file,
    ):
      for start in range(0, len(source), 4 * threads):
        indices = range(start, min(len(source), start + 4 * threads))
        for index, image in zip(indices, pool.map(decode, indices)):
          offsets[index + 1] = offsets[index]
          if isinstance(image, UnreadableImageError):
            errors[index] = str(image)
            continue
          file.write(memoryview(np.ascontiguousarray(image, np.uint8)).cast("B"))
          offsets[index + 1] += image.size
          shapes[index] = image.shape[:2]
      file.write(b"\0")  # a mapping cannot be empty, even when no image could be read
    return offsets, shapes, errors

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.image(index), int(self.labels[index])

  def image(self, index: int, shorter_side: int | None = None) -> np.ndarray:
    """The cached pixels (a read-only view), or, for a native cache asked to scale, those pixels scaled."""
    if shorter_side != self.shorter_side and self.shorter_side is not None:
      raise ValueError(f"this decoded cache holds images scaled to {self.shorter_side} px, not {shorter_side}")
    if index in self._errors:
      raise UnreadableImageError(self._errors[index])
    if self._pixels is None:  # first access in this process: map the file the training process wrote
      self._pixels = np.memmap(self._path, np.uint8, mode="r")
    height, width = self._shapes[index]
    image = self._pixels[self._offsets[index] : self._offsets[index + 1]].reshape(height, width, 3)
    return image if shorter_side == self.shorter_side else preprocess.resize_shorter_side(image, shorter_side)

  def __getstate__(self) -> dict:
    """What a Grain worker needs: the file's path and the index, not this process's mapping or descriptor."""
    state = {key: value for key, value in self.__dict__.items() if key not in ("_pixels", "_finalizer", "_fd")}
    return {**state, "_pixels": None}
