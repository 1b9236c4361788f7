"""Classifies images with a trained detector: `python -m flax_detector.predict --workdir=DIR PATH...`.

Writes CSV `path,p_ai,label` (one row per readable image, LF line endings) to stdout or --output.
p_ai is calibrated with the temperature fitted on the run's validation split, and the label uses the
threshold chosen there (override with --threshold); --unsure=LO,HI labels scores inside that band
`unsure`, because a score near the cut-off is not a verdict. Folders are indexed as training indexes
them (symlinks followed once, hidden files skipped) and every file's header is checked against the
run's data.max_image_pixels before it is decoded. Unreadable files get a warning on stderr and no
row; the exit code is non-zero only when no image could be read.

--explain=OUT_DIR also writes, per image, a Grad-CAM overlay PNG of its evidence for the positive class
(gradcam.py) into OUT_DIR, named after the image's file (`cat.jpg` -> `cat.png`, `cat-2.png` for the
next `cat.*`), and adds its path as a CSV column `explanation`. The maps come from the same compiled
call as the scores.
"""

import contextlib
import csv
import dataclasses
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from etils import epath
from PIL import Image

from flax_detector import compilation, errors, gradcam, host_allocator, inference
from flax_detector.data.decode import UnreadableImageError, read_image, read_or_skip
from flax_detector.data.folder import DEFAULT_MAX_IMAGE_PIXELS, list_images
from flax_detector.data.probe import printable, probe_file


@dataclasses.dataclass(frozen=True)
class Decision:
  """How a calibrated p_ai becomes a label."""

  threshold: float
  unsure: tuple[float, float] | None = None

  def label(self, p_ai: float, positive_name: str, negative_name: str) -> str:
    if self.unsure is not None and self.unsure[0] < p_ai < self.unsure[1]:
      return "unsure"
    return positive_name if p_ai >= self.threshold else negative_name


def parse_unsure(values: Sequence[str] | None) -> tuple[float, float] | None:
  if not values:
    return None
  try:
    low, high = (float(value) for value in values)
  except ValueError as error:
    raise errors.UserError(f"--unsure={','.join(values)}: give two numbers LO,HI with 0 <= LO < HI <= 1") from error
  if not 0.0 <= low < high <= 1.0:
    raise errors.UserError(f"--unsure={low},{high}: need 0 <= LO < HI <= 1")
  return low, high


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given, folders expanded recursively to their image files; missing paths warned about."""
  expanded: list[str] = []
  for given in paths:
    path = epath.Path(given)
    if path.is_dir():
      expanded.extend(list_images(path))
    elif path.exists():
      expanded.append(given)
    else:
      print(f"warning: {printable(given)}: no such file or folder", file=sys.stderr)
  return expanded


def _warn_on_stderr(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _image_loader(detector: inference.Detector):
  """Reads a path as training's evaluation read its images (at detector.decoded_side), refusing oversized ones."""
  max_pixels = detector.config.data.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)

  def read_checked(path: str) -> np.ndarray:
    info = probe_file(path, max_pixels, decode=False)  # refuses an oversized image before decoding it
    if not info.ok:
      raise UnreadableImageError(f"{printable(path)}: {info.error}")
    return read_image(path, detector.decoded_side)

  def load_image(path: str) -> np.ndarray | None:
    return read_or_skip(lambda: read_checked(path), "skipped", warn=_warn_on_stderr)

  return load_image


class OverlayWriter:
  """Writes Grad-CAM overlays into one folder, one PNG per image, named after the image's file.

  Names are the file's stem with characters that are unsafe in file names replaced; a stem already
  used in this run gets -2, -3, ... so two `cat.jpg` from different folders never overwrite each other.
  """

  def __init__(self, detector: inference.Detector, folder: str):
    self._detector = detector
    self._folder = epath.Path(folder)
    self._folder.mkdir(parents=True, exist_ok=True)
    self._taken: set[str] = set()

  def _name(self, path: str) -> str:
    stem = re.sub(r"[^\w.-]", "_", os.path.splitext(os.path.basename(path))[0]).lstrip(".")[:100] or "image"
    name, number = f"{stem}.png", 1
    while name.lower() in self._taken:  # case-insensitive file systems see Cat.png and cat.png as one file
      number += 1
      name = f"{stem}-{number}.png"
    self._taken.add(name.lower())
    return name

  def write(self, path: str, image: np.ndarray, view_cams: np.ndarray) -> str:
    """Writes the overlay of one image and returns the PNG's path."""
    heat = self._detector.heatmap(view_cams, image.shape[:2])
    target = self._folder / self._name(path)
    with target.open("wb") as stream:
      Image.fromarray(gradcam.overlay(image, heat)).save(stream, format="PNG")
    return os.fspath(target)


def predict(
  workdir: str,
  paths: Sequence[str],
  output: str | None,
  batch_size: int | None,
  threshold: float | None = None,
  unsure: tuple[float, float] | None = None,
  explain_dir: str | None = None,
) -> int:
  """Writes the CSV (and, with explain_dir, one Grad-CAM overlay per image) and returns the images classified."""
  detector = inference.load_detector(workdir, batch_size)
  names = detector.class_names
  positive = detector.positive
  negative_name = names[1 - positive] if len(names) == 2 else None
  decision = Decision(detector.calibration.threshold if threshold is None else threshold, unsure)
  overlays = OverlayWriter(detector, explain_dir) if explain_dir else None
  written = 0
  with open(output, "w", newline="") if output else contextlib.nullcontext(sys.stdout) as stream:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["path", "p_ai", "label"] + (["explanation"] if overlays else []))
    for batch in inference.stream_scores(
      detector, expand_paths(paths), _image_loader(detector), "predict", explain=overlays is not None
    ):
      probabilities = detector.calibration.probabilities(batch.log_probs)
      for index, (path, row) in enumerate(zip(batch.items, probabilities)):
        label = (
          decision.label(float(row[positive]), names[positive], negative_name)
          if negative_name
          else names[int(np.argmax(row))]
        )
        explanation = [printable(overlays.write(path, batch.images[index], batch.view_cams[index]))] if overlays else []
        writer.writerow([printable(path), f"{row[positive]:.6f}", label] + explanation)
      written += len(batch.items)
      stream.flush()
  return written


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.")
  flags.DEFINE_string("output", None, "CSV file to write; stdout when unset.")
  flags.DEFINE_integer("batch_size", None, "Images per inference batch; defaults to the config's eval_batch_size.")
  flags.DEFINE_float(
    "threshold",
    None,
    "Decision threshold on the calibrated p_ai; default: the one chosen on the "
    "run's validation split (calibration.json), or 0.5 for runs without one.",
  )
  flags.DEFINE_list("unsure", None, "LO,HI: label images whose p_ai lies strictly between LO and HI `unsure`.")
  flags.DEFINE_string(
    "explain",
    None,
    "OUT_DIR: also write a Grad-CAM overlay PNG per image there, showing where "
    "the evidence for the positive class lies; the CSV gains an `explanation` column.",
  )
  flags.DEFINE_bool("verbose", False, "Show library log lines (checkpoint restore, compilation) on stderr.")
  flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  host_allocator.keep_freed_memory_mapped()  # before JAX starts
  compilation.keep_compiled_programs()
  compilation.generate_cpu_code_at_o2()
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Give one or more image files or folders to classify.")
  if not FLAGS.verbose:
    inference.quiet_library_logs()
  try:
    with errors.as_user_errors():
      written = predict(
        FLAGS.workdir, paths, FLAGS.output, FLAGS.batch_size, FLAGS.threshold, parse_unsure(FLAGS.unsure), FLAGS.explain
      )
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  if written == 0:
    print("error: no readable image among the given paths", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main)
