"""An image folder laid out as <dir>/<split>/<class name>/**/<image>, as a random-access source."""

from collections.abc import Sequence

from absl import logging
from etils import epath
import numpy as np

from flax_detector.data.decode import IMAGE_EXTENSIONS, read_image


def _is_hidden(path: epath.Path) -> bool:
  return path.name.startswith(".")


def list_images(folder: epath.Path) -> list[epath.Path]:
  """Every image file under `folder`, recursively, sorted; hidden files and folders are skipped."""
  found: list[epath.Path] = []
  pending = [folder]
  while pending:
    current = pending.pop()
    for child in current.iterdir():
      if _is_hidden(child):
        continue
      if child.is_dir():
        pending.append(child)
      elif child.suffix.lower() in IMAGE_EXTENSIONS:
        found.append(child)
  return sorted(found, key=str)


class ImageFolderSource:
  """The images of one split of an image folder; a record is read and decoded only when accessed."""

  def __init__(self, data_dir: str, split: str, class_names: Sequence[str]):
    root = epath.Path(data_dir)
    split_dir = root / split
    if not root.is_dir():
      raise FileNotFoundError(f"data.dir={data_dir}: no such folder; point --config.data.dir at a folder "
                              f"holding train/ and test/, or leave it empty for the built-in synthetic set")
    if not split_dir.is_dir():
      raise FileNotFoundError(f"{split_dir}: missing; data.dir must hold {split}/<class>/... with classes "
                              f"{list(class_names)}")
    present = sorted(child.name for child in split_dir.iterdir() if child.is_dir() and not _is_hidden(child))
    unknown = sorted(set(present) - set(class_names))
    if unknown:
      logging.warning("%s: ignoring folders %s that are not in data.class_names=%s", split_dir, unknown,
                      list(class_names))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
      class_dir = split_dir / name
      if not class_dir.is_dir():
        raise FileNotFoundError(f"{class_dir}: missing class folder; found {present}. Rename the folders or "
                                f"set --config.data.class_names")
      images = list_images(class_dir)
      if not images:
        raise ValueError(f"{class_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}, any letter case)")
      paths.extend(str(path) for path in images)
      labels.extend([label] * len(images))
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    # Keys relative to data.dir keep the validation split stable when the folder moves.
    self.keys = [str(epath.Path(path).relative_to(root)) for path in paths]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return read_image(self.paths[index]), int(self.labels[index])
