"""An image folder laid out as <dir>/<split>/<class name>/**/<image>, indexed once and checked once.

The index is what every command counts with (training's splits and class weights, prepare, predict),
so it must count each real image exactly once: symlinks are followed at most once per real folder and
file (a loop or a second link to the same file is reported once and not counted again), names in any
encoding work, and every file is probed before training (see probe.py), so unreadable, truncated and
oversized files are left out of the splits, the counts and the weights instead of surfacing hours in.
"""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from flax_detector import workdir
from flax_detector.data.decode import IMAGE_EXTENSIONS, read_image
from flax_detector.data.probe import ImageInfo, printable, probe_files

BAD_FILE_POLICIES = ("skip", "error")
# One decoded RGB image of this many pixels is 120 MB; with Pillow's intermediate copies a Grain
# worker stays well under a gigabyte. A 12000x12000 scan (144 M pixels) is refused before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


@dataclasses.dataclass(frozen=True)
class IndexOptions:
  """How a folder is checked: the size limit, what a bad file does, where probe results are cached."""

  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
  on_bad_file: str = "skip"  # "skip": leave it out and list it; "error": stop before training
  cache_path: epath.Path | None = None  # probe results by path, size and mtime
  update_cache: bool = True  # False on all but one process of a multi-host job: one writer


@dataclasses.dataclass(frozen=True)
class Listing:
  """The image files under a folder, each real file once, and what was noticed on the way."""

  paths: list[str]
  notes: list[str]  # symlink loops and duplicate links, one line each


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def _is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_local(root: str) -> Listing:
  """Depth-first in sorted order, so the same tree always yields the same paths and the same notes."""
  found: list[tuple[str, tuple[int, int] | None]] = []
  notes: list[str] = []
  visited: dict[tuple[int, int], str] = {}
  pending = [root]
  while pending:
    folder = pending.pop()
    stat = os.stat(folder)
    identity = (stat.st_dev, stat.st_ino)
    if identity in visited:
      notes.append(
        f"{printable(folder)}: leads back to {printable(visited[identity])} (a symlink loop or a second "
        "link to a folder); not followed again"
      )
      continue
    visited[identity] = folder
    with os.scandir(folder) as scan:
      entries = sorted((entry for entry in scan if not _is_hidden(entry.name)), key=lambda entry: entry.name)
    subfolders = []
    for entry in entries:
      try:
        is_folder = entry.is_dir()
      except OSError:
        is_folder = False
      if is_folder:
        subfolders.append(entry.path)
      elif _is_image_name(entry.name):
        try:
          file_stat = entry.stat()
          found.append((entry.path, (file_stat.st_dev, file_stat.st_ino)))
        except OSError:  # a dangling symlink: kept, so the probe lists it as unreadable
          found.append((entry.path, None))
    pending.extend(reversed(subfolders))
  paths: list[str] = []
  first_path: dict[tuple[int, int], str] = {}
  for path, identity in sorted(found):
    if identity is not None and identity in first_path:
      notes.append(f"{printable(path)}: the same file as {printable(first_path[identity])}; counted once")
      continue
    if identity is not None:
      first_path[identity] = path
    paths.append(path)
  return Listing(paths, notes)


def _walk_remote(root: epath.Path) -> Listing:
  """Buckets have no symlinks: a plain recursive listing."""
  found: list[str] = []
  pending = [root]
  while pending:
    folder = pending.pop()
    for child in folder.iterdir():
      if _is_hidden(child.name):
        continue
      if child.is_dir():
        pending.append(child)
      elif _is_image_name(child.name):
        found.append(str(child))
  return Listing(sorted(found), [])


def find_images(folder: epath.PathLike) -> Listing:
  """Every image file under `folder`, recursively, sorted; hidden files and folders are skipped."""
  if workdir.is_url(folder):
    return _walk_remote(epath.Path(folder))
  return _walk_local(os.fspath(folder))


def list_images(folder: epath.PathLike) -> list[str]:
  """find_images' paths, with each loop or duplicate link warned about once."""
  listing = find_images(folder)
  for note in listing.notes:
    logging.warning("%s", note)
  return listing.paths


def skipped_lines(infos: Sequence[ImageInfo]) -> list[str]:
  """`path<TAB>reason` lines of the files left out, names readable whatever their encoding."""
  return [f"{printable(info.path)}\t{info.error}" for info in infos if not info.ok]


class ImageFolderSource:
  """The readable images of one split of an image folder; a record is decoded only when accessed."""

  def __init__(self, data_dir: str, split: str, class_names: Sequence[str], options: IndexOptions = IndexOptions()):
    root = epath.Path(data_dir)
    split_dir = root / split
    if not root.is_dir():
      raise FileNotFoundError(
        f"data.dir={data_dir}: no such folder; point --config.data.dir at a folder "
        f"holding train/ and test/, or leave it empty for the built-in synthetic set"
      )
    if not split_dir.is_dir():
      raise FileNotFoundError(
        f"{split_dir}: missing; data.dir must hold {split}/<class>/... with classes {list(class_names)}"
      )
    present = sorted(child.name for child in split_dir.iterdir() if child.is_dir() and not _is_hidden(child.name))
    unknown = sorted(set(present) - set(class_names))
    if unknown:
      logging.warning(
        "%s: ignoring folders %s that are not in data.class_names=%s", split_dir, unknown, list(class_names)
      )
    listed: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
      class_dir = split_dir / name
      if not class_dir.is_dir():
        raise FileNotFoundError(
          f"{class_dir}: missing class folder; found {present}. Rename the folders or set --config.data.class_names"
        )
      images = list_images(class_dir)
      if not images:
        raise ValueError(f"{class_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}, any letter case)")
      listed.extend((path, label) for path in images)
    infos = probe_files(
      [path for path, _ in listed], options.max_image_pixels, options.cache_path, update_cache=options.update_cache
    )
    self.skipped: list[ImageInfo] = [info for info in infos if not info.ok]
    _report_bad_files(split_dir, self.skipped, len(infos), options.on_bad_file)
    kept = [(info, label) for info, (_, label) in zip(infos, listed) if info.ok]
    self.infos: list[ImageInfo] = [info for info, _ in kept]
    self.paths = [info.path for info in self.infos]
    self.labels = np.asarray([label for _, label in kept], np.int32)
    self._root = root
    # Keys relative to data.dir keep the validation split stable when the folder moves.
    self.keys = [self.key_of(path) for path in self.paths]
    self.sizes = np.asarray([(info.height, info.width) for info in self.infos], np.int64).reshape(-1, 2)
    for label, name in enumerate(class_names):
      if not np.any(self.labels == label):
        raise ValueError(
          f"{split_dir / name}: no readable images; all its files were left out (see the warning "
          "above); fix or replace them"
        )

  def key_of(self, path: str) -> str:
    """A file's name relative to data.dir."""
    if workdir.is_url(self._root):
      return str(epath.Path(path).relative_to(self._root))
    return os.path.relpath(path, os.fspath(self._root))

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.image(index), int(self.labels[index])

  def image(self, index: int, shorter_side: int | None = None) -> np.ndarray:
    return read_image(self.paths[index], shorter_side)


def _report_bad_files(split_dir: epath.Path, bad: Sequence[ImageInfo], total: int, policy: str) -> None:
  if not bad:
    return
  example = f"{printable(bad[0].path)}: {bad[0].error}"
  if policy == "error":
    raise ValueError(
      f"{split_dir}: {len(bad)} of {total} files cannot be used, e.g. {example}. Fix or remove them, "
      "or set --config.data.on_bad_file=skip to leave them out"
    )
  logging.warning(
    "%s: %d of %d files left out (unreadable, truncated or too large), e.g. %s; the run's "
    "skipped_files.txt lists them all",
    split_dir,
    len(bad),
    total,
    example,
  )
