"""Grain pipelines: which records form each global batch, and how each process loads its share.

The order is defined on global record positions, never on processes or workers: global training
batch k holds the shuffled positions [k*B, (k+1)*B) of the repeated training split, and process p
of P loads the p-th contiguous 1/P of it. So a seed and a global batch size fix every batch on any
number of hosts, devices and Grain workers. Each example's augmentation draws from
numpy's Generator seeded with (seed, record, epoch).

Batches are dicts {"image": uint8[b, S, S, 3], "label": int32[b], "mask": bool[b]} of the
process-local share b = B / P; eval images carry a views axis, uint8[b, V, S, S, 3]. Evaluation pads the
split to whole global batches with masked examples, so every process runs the same number of steps and every
example counts exactly once.
Unreadable, truncated and oversized files are left out when the folder is indexed (data/folder.py);
a file that becomes unreadable later is masked out of its batch with a warning naming it.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import grain
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from flax_detector import host_allocator, preprocess, shared_memory_release, worker_lifetime
from flax_detector import workdir as workdir_layout
from flax_detector.config_validation import MIN_IMAGE_SIZE
from flax_detector.data import array_record, decoded_cache
from flax_detector.data.decode import read_or_skip
from flax_detector.data.decoded_cache import DecodedCache
from flax_detector.data.folder import ImageFolderSource, IndexOptions
from flax_detector.data.probe import ImageInfo
from flax_detector.data.sources import ImageSource, class_counts, split_off_validation
from flax_detector.data.synthetic import SyntheticSource


@dataclasses.dataclass(frozen=True)
class Splits:
  """The training split, the validation share carved from it, and the held-out test split.

  `folders` holds the indexed image folders ({"train": ..., "test": ...}) when data.dir is a plain
  image folder: their per-file facts feed the shortcut audit and skipped_files.txt.
  """

  train: ImageSource
  validation: ImageSource
  test: ImageSource
  folders: dict[str, ImageFolderSource] = dataclasses.field(default_factory=dict)

  @property
  def skipped(self) -> list[ImageInfo]:
    return [info for folder in self.folders.values() for info in folder.skipped]


@dataclasses.dataclass(frozen=True)
class SourceSettings:
  """Where a run's images come from: the data.* fields that decide the three splits."""

  dir: str  # "" for the built-in synthetic set
  class_names: tuple[str, ...]
  val_fraction: float
  max_image_pixels: int
  on_bad_file: str
  synthetic_sizes: tuple[int, int]  # records in the synthetic train and test splits
  synthetic_sides: tuple[int, int]  # smallest and largest synthetic image side
  # Decode train/ (and its validation share) once, into shared memory: True, False or "auto".
  cache_decoded: bool | str = False
  decoded_side: int | None = None  # preprocess.decoded_side(...): the shorter side images are scaled to while decoding

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SourceSettings":
    data = config.data
    return cls(
      data.dir,
      tuple(data.class_names),
      data.val_fraction,
      data.max_image_pixels,
      data.on_bad_file,
      (data.synthetic_train_size, data.synthetic_test_size),
      (data.synthetic_min_side, data.synthetic_max_side),
      data.cache_decoded,
      preprocess.decoded_side(config.image_size, data.preprocess),
    )

  def index_options(self, workdir: epath.Path | None, process_index: int) -> IndexOptions:
    """How to check the folder; the probe cache lives in the run's workdir, written by process 0 only."""
    return IndexOptions(
      max_image_pixels=self.max_image_pixels,
      on_bad_file=self.on_bad_file,
      cache_path=None if workdir is None else workdir / workdir_layout.FILE_INDEX_CACHE,
      update_cache=process_index == 0,
    )


def load_split(
  settings: SourceSettings, split: str, workdir: epath.Path | None = None, process_index: int = 0
) -> ImageSource:
  """One split ("train" or "test") of data.dir: a prepared copy, an image folder, or the synthetic set."""
  if settings.dir and array_record.is_prepared(settings.dir):
    # A folder written by flax_detector.prepare holds the same records, keys and order as the image folder.
    return array_record.ArrayRecordImageSource(settings.dir, split, settings.class_names)
  if settings.dir:
    return ImageFolderSource(settings.dir, split, settings.class_names, settings.index_options(workdir, process_index))
  size = settings.synthetic_sizes[0] if split == "train" else settings.synthetic_sizes[1]
  return SyntheticSource(split, size, *settings.synthetic_sides)


def load_splits(settings: SourceSettings, workdir: epath.Path | None = None, process_index: int = 0) -> Splits:
  """Indexes data.dir (or builds the synthetic set) and carves the validation split from train/.

  With data.cache_decoded, train/ is decoded once into memory first (data/decoded_cache.py); the test split,
  read once at the end, is not.
  """
  full_train, test = (load_split(settings, split, workdir, process_index) for split in ("train", "test"))
  folders = {
    split: source for split, source in (("train", full_train), ("test", test)) if isinstance(source, ImageFolderSource)
  }
  cache_folder = None if workdir is None else os.fspath(workdir)
  cache = settings.cache_decoded
  if cache == "auto":
    cache, why = decoded_cache.fits_easily(full_train, settings.decoded_side, cache_folder)
    logging.info("data.cache_decoded='auto': %s, since %s", "caching" if cache else "not caching", why)
  if cache:
    full_train = DecodedCache(full_train, settings.decoded_side, cache_folder)
  train, validation = split_off_validation(full_train, settings.val_fraction)
  for name, split in (("train", train), ("validation", validation), ("test", test)):
    counts = class_counts(split, len(settings.class_names))
    logging.info(
      "%s split: %d images, %s",
      name,
      len(split),
      ", ".join(f"{cls}={count}" for cls, count in zip(settings.class_names, counts)),
    )
  return Splits(train=train, validation=validation, test=test, folders=folders)


def crop_size(train: ImageSource, image_size: int, preprocess_mode: str, crop_policy: str, quantile: float) -> int:
  """The crop side training and evaluation use: image_size, or less under data.crop_policy="shared"."""
  if preprocess_mode != "crop" or crop_policy != "shared":
    return image_size
  if train.sizes is None:
    logging.warning(
      "data.crop_policy=shared: the prepared data.dir records no image sizes (prepared by an older "
      "version); using image_size=%d. Re-run flax_detector.prepare --overwrite to record them.",
      image_size,
    )
    return image_size
  return preprocess.shared_crop_size(train.sizes, image_size, quantile, MIN_IMAGE_SIZE)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long training runs: the fields that turn a training split's size into epochs and steps."""

  batch_size: int  # global
  num_epochs: int
  min_train_steps: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Schedule":
    return cls(config.batch_size, config.num_epochs, config.min_train_steps)

  def epochs(self, num_records: int) -> int:
    """Passes over the training split: num_epochs, or more when needed to reach min_train_steps."""
    return max(self.num_epochs, math.ceil(self.min_train_steps * self.batch_size / max(num_records, 1)))

  def steps(self, num_records: int) -> int:
    """Steps the schedule spans: whole global batches in epochs(...) passes over the training split."""
    epochs = self.epochs(num_records)
    steps = (epochs * num_records) // self.batch_size
    if steps < 1:
      raise ValueError(
        f"batch_size={self.batch_size} exceeds the {epochs} epoch(s) of "
        f"{num_records} training images: lower batch_size or raise num_epochs"
      )
    return steps


class _RecordAndEpoch(grain.transforms.MapWithIndex):
  """Global position -> (record index, epoch), from the shuffled, repeated record indices."""

  def __init__(self, num_records: int):
    self._num_records = num_records

  def map_with_index(self, index: int, record: int) -> tuple[int, int]:
    return record, index // self._num_records


def _read_or_skip(source: ImageSource, index: int, image_size: int, mode: str) -> np.ndarray | None:
  """The decoded image (see preprocess.decoded_side), or None with a warning naming the file when it cannot be read."""
  shorter_side = preprocess.decoded_side(image_size, mode)
  return read_or_skip(lambda: source.image(index, shorter_side), "it is masked out of its batch and skipped")


class _LoadTrainBatch(grain.transforms.Map):
  """Reads, decodes and augments one process-local training batch, inside a Grain worker."""

  def __init__(self, source: ImageSource, seed: int, image_size: int, mode: str, options: preprocess.AugmentOptions):
    self._source, self._seed, self._image_size, self._mode, self._options = source, seed, image_size, mode, options

  def map(self, positions: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    records, epochs = positions
    images, mask = [], []
    for record, epoch in zip(records, epochs):
      image = _read_or_skip(self._source, int(record), self._image_size, self._mode)
      mask.append(image is not None)
      if image is None:
        images.append(np.zeros((self._image_size, self._image_size, 3), np.uint8))
        continue
      rng = np.random.default_rng((self._seed, int(record), int(epoch)))
      images.append(preprocess.train_transform(image, self._image_size, self._mode, self._options, rng))
    return {
      "image": np.stack(images),
      "label": self._source.labels[records].astype(np.int32),
      "mask": np.asarray(mask, bool),
    }


class _LoadEvalBatch(grain.transforms.Map):
  """Decodes one process-local eval batch of [b, views, S, S, 3]; padding and unreadable files are masked."""

  def __init__(self, source: ImageSource, image_size: int, mode: str, grid: int):
    self._source, self._image_size, self._mode, self._grid = source, image_size, mode, grid

  def map(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    num_records = len(self._source)
    images, mask = [], []
    for position in positions:
      image = (
        _read_or_skip(self._source, int(position), self._image_size, self._mode) if position < num_records else None
      )
      mask.append(image is not None)
      if image is None:
        images.append(np.zeros((self._grid**2, self._image_size, self._image_size, 3), np.uint8))
      else:
        images.append(preprocess.eval_transform(image, self._image_size, self._mode, self._grid))
    labels = np.zeros(len(positions), np.int32)
    real = positions < num_records
    labels[real] = self._source.labels[positions[real]]
    return {"image": np.stack(images), "label": labels, "mask": np.asarray(mask, bool)}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What the training batches depend on: the schedule, the seed and how each image becomes a crop."""

  schedule: Schedule
  seed: int
  image_size: int
  preprocess_mode: str  # data.preprocess
  augment: preprocess.AugmentOptions

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TrainSettings":
    return cls(
      Schedule.from_config(config),
      config.seed,
      config.image_size,
      config.data.preprocess,
      preprocess.AugmentOptions.from_config(config.data),
    )


def train_dataset(
  source: ImageSource, settings: TrainSettings, process_index: int, process_count: int
) -> grain.MapDataset:
  """This process's training batches, one element per step, for the whole run.

  The global batch size divides by the process count (config_validation checks it divides by the devices).
  """
  num_records, schedule = len(source), settings.schedule
  positions = (
    grain.MapDataset.range(num_records)
    .shuffle(seed=settings.seed)
    .repeat(schedule.epochs(num_records))
    .map_with_index(_RecordAndEpoch(num_records))
    .batch(schedule.batch_size // process_count, drop_remainder=True)
  )
  local = positions[: schedule.steps(num_records) * process_count][process_index::process_count]
  return local.map(
    _LoadTrainBatch(source, settings.seed, settings.image_size, settings.preprocess_mode, settings.augment)
  )


def num_eval_steps(num_records: int, eval_batch_size: int) -> int:
  return max(1, math.ceil(num_records / eval_batch_size))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What an eval batch depends on: the global batch size and how each image becomes its views."""

  batch_size: int  # global: every process runs the same number of steps of this many examples
  image_size: int
  preprocess_mode: str  # data.preprocess
  grid: int  # grid x grid views per image

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EvalSettings":
    return cls(config.eval_batch_size, config.image_size, config.data.preprocess, config.data.eval_grid)


def eval_dataset(
  source: ImageSource, settings: EvalSettings, process_index: int, process_count: int
) -> grain.MapDataset:
  """This process's eval batches: the split in order, padded to whole global batches and masked."""
  local_batch = settings.batch_size // process_count
  steps = num_eval_steps(len(source), settings.batch_size)
  positions = grain.MapDataset.range(steps * settings.batch_size).batch(local_batch)
  return positions[process_index::process_count].map(
    _LoadEvalBatch(source, settings.image_size, settings.preprocess_mode, settings.grid)
  )


def _start_worker(tie_lifetime: Callable[[int, int], None], worker_index: int, worker_count: int) -> None:
  """Grain's worker_init_fn: the allocator settings for decoding (see host_allocator), then the watchdog that
  ends the worker with this process."""
  host_allocator.keep_freed_memory_mapped_while_decoding()
  tie_lifetime(worker_index, worker_count)


def make_iterator(
  dataset: grain.MapDataset, worker_count: int, worker_buffer_size: int, start: int = 0
) -> grain.DatasetIterator:
  """Iterates `dataset` from element `start`, decoding in `worker_count` Grain processes.

  Each process (a worker, or this one when worker_count is 0) decodes one batch at a time and keeps
  at most `worker_buffer_size` ready. Grain's default ReadOptions would run 16 threads per process
  that read up to 500 batches ahead: on a small CPU they take the cores the step needs, and over an
  endlessly repeated eval split they would decode it again and again, unasked. The workers exit
  when this process dies, even by SIGKILL (see worker_lifetime), keep the memory they free for their next
  image (see host_allocator), and the batches they send are closed exactly once (see shared_memory_release).
  """
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=worker_buffer_size)
  iter_dataset = dataset[start:].to_iter_dataset(read_options)
  if worker_count > 0:
    shared_memory_release.close_each_batch_once()
    iter_dataset = iter_dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size),
      worker_init_fn=functools.partial(_start_worker, worker_lifetime.worker_init_fn()),
    )
  return iter(iter_dataset)
