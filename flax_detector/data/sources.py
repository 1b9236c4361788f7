"""What every image source offers the input pipeline: random access to (image, label) records.

Sources are Grain random-access data sources (`__len__`, `__getitem__`), picklable so Grain worker
processes can decode in parallel. `labels` is known without decoding, for class counts and weights;
`keys` name records stably (relative paths), for the validation split and error messages.
`sizes` (int[n, 2] of height, width) is known without decoding too: the crop policy and the
shortcut audit need every image's size before training starts.
`image(index, shorter_side)` is the input pipeline's way in: under data.preprocess="resize" it asks for
the image already scaled, which a JPEG source decodes at reduced scale (see decode.decode_image).
"""

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ImageSource(Protocol):
  """A random-access set of labelled images."""

  labels: np.ndarray  # int32[n], the class index of every record
  keys: Sequence[str]  # a stable name of every record
  sizes: np.ndarray | None  # int64[n, 2]: (height, width) of every record; None where not known

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """Returns (uint8[H, W, 3] image, label) of record `index`."""
    ...

  def image(self, index: int, shorter_side: int | None = None) -> np.ndarray:
    """Record `index`'s image; with `shorter_side`, scaled to preprocess.resized_shape of its full size."""
    ...


class SubsetSource:
  """The records `indices` of another source, e.g. the validation share of train/."""

  def __init__(self, source: ImageSource, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    self.labels = np.asarray(source.labels)[self._indices]
    self.keys = [source.keys[i] for i in self._indices]
    self.sizes = None if source.sizes is None else np.asarray(source.sizes)[self._indices]

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self._source[int(self._indices[index])]

  def image(self, index: int, shorter_side: int | None = None) -> np.ndarray:
    return self._source.image(int(self._indices[index]), shorter_side)


def _stable_fraction(key: str) -> float:
  """Maps a record key to [0, 1) independently of seed, file order and the other files present."""
  # fsencode: a file name that is not valid UTF-8 hashes by its bytes instead of failing.
  digest = hashlib.sha256(os.fsencode(key)).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_off_validation(source: ImageSource, fraction: float) -> tuple[SubsetSource, SubsetSource]:
  """Carves (train, validation) out of `source` by a hash of each key.

  Hashing the key, not shuffling, keeps a file in the same split when files are added or removed,
  so validation never leaks into training across runs on a growing folder. `fraction` is in [0, 1).
  """
  in_validation = np.array([_stable_fraction(key) < fraction for key in source.keys], dtype=bool)
  indices = np.arange(len(source))
  return SubsetSource(source, indices[~in_validation]), SubsetSource(source, indices[in_validation])


def class_counts(source: ImageSource, num_classes: int) -> np.ndarray:
  return np.bincount(np.asarray(source.labels, np.int64), minlength=num_classes)
