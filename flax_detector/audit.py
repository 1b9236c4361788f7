"""Does the folder's metadata alone tell the classes apart? A shortcut audit to run before training.

The public "Anime Art: AI or Human?" data is a trap: its human images are ~80-130 px anime faces saved
as PNG, its AI images 512x512 StyleGAN JPEGs. A detector scores ~100% on it from image size,
zero-padding or JPEG history without learning a single generator trace, and then fails on real
images. This module measures that risk from the file probe alone (no pixels): per-class statistics,
and the held-out accuracy of a small decision tree that sees only metadata. If that tree beats chance,
the test accuracy of any detector trained on the folder says little about what it learnt.

`python -m flax_detector.audit --data_dir=DATA [--output=audit.json]` writes the audit as JSON and
prints a short summary to stderr.
"""

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath

from flax_detector import workdir as workdir_module
from flax_detector.data.folder import DEFAULT_MAX_IMAGE_PIXELS, list_images
from flax_detector.data.probe import ImageInfo, probe_files

SPLITS = ("train", "test")
# metadata_accuracy must beat chance by this much to call the metadata a shortcut: a margin a
# depth-3 tree does not reach by luck on a few hundred records of noise.
SHORTCUT_MARGIN = 0.10
NUM_FOLDS = 5
TREE_DEPTH = 3
MIN_LEAF = 5

# Single features in the order ties are broken: the plainest explanation of a shortcut first.
# Each entry: feature name, the words used in the finding.
_FEATURES = (
  ("width", "width"),
  ("height", "height"),
  ("log_pixels", "pixel count"),
  ("aspect", "aspect ratio (w/h)"),
  ("bytes_per_pixel", "bytes per pixel"),
  ("format", "file format"),
  ("mode", "colour mode"),
  ("jpeg_quality", "JPEG quality"),
  ("would_pad", "padding"),
)


@dataclasses.dataclass(frozen=True)
class AuditRecord:
  """One readable image: the split it is in, its class index and what the probe learnt about it."""

  split: str
  label: int
  info: ImageInfo


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
  """min / p5 / median / p95 / max: the tails show outliers that a mean hides."""
  if values.size == 0:
    return None
  points = np.percentile(values, [0, 5, 50, 95, 100])
  return {key: round(float(value), 4) for key, value in zip(("min", "p5", "median", "p95", "max"), points)}


def _shares(names: Sequence[str]) -> dict[str, float]:
  """Share of each name, largest first."""
  unique, counts = np.unique(np.asarray(names, dtype=object).astype(str), return_counts=True)
  order = np.argsort(-counts, kind="stable")
  return {str(unique[i]): round(float(counts[i]) / len(names), 4) for i in order}


def _would_pad(info: ImageInfo, crop_size: int) -> bool:
  return info.width < crop_size or info.height < crop_size


def _group_stats(infos: Sequence[ImageInfo], crop_size: int) -> dict[str, Any]:
  """The statistics of one split and class (or of one class over all splits)."""
  width = np.array([info.width for info in infos], np.float64)
  height = np.array([info.height for info in infos], np.float64)
  qualities = [info.jpeg_quality for info in infos if info.format == "JPEG" and info.jpeg_quality is not None]
  return {
    "count": len(infos),
    "width": _percentiles(width),
    "height": _percentiles(height),
    "aspect": _percentiles(width / np.maximum(height, 1)),
    "bytes_per_pixel": _percentiles(np.array([info.num_bytes for info in infos]) / np.maximum(width * height, 1)),
    "pixels": _percentiles(width * height),
    "format": _shares([info.format for info in infos]) if infos else {},
    "mode": _shares([info.mode for info in infos]) if infos else {},
    "jpeg_quality": (
      {"median": float(np.median(qualities)), "min": min(qualities), "max": max(qualities)} if qualities else None
    ),
    "pad_share": round(float(np.mean([_would_pad(info, crop_size) for info in infos])), 4) if infos else None,
  }


def feature_matrix(infos: Sequence[ImageInfo], crop_size: int) -> tuple[np.ndarray, list[str], list[str]]:
  """float[n, f] metadata features, each column's name, and the single feature each column belongs to.

  Categories become one-hot columns (`format=PNG`, `mode=RGB`); JPEG quality is 0 with `not_jpeg` = 1
  for files that carry none, so the tree can split on "is it a JPEG" and on the quality separately.
  """
  width = np.array([info.width for info in infos], np.float64)
  height = np.array([info.height for info in infos], np.float64)
  pixels = np.maximum(width * height, 1)
  quality = [info.jpeg_quality if info.format == "JPEG" else None for info in infos]
  columns = [
    width,
    height,
    np.log(pixels),
    width / np.maximum(height, 1),
    np.array([info.num_bytes for info in infos], np.float64) / pixels,
  ]
  names = ["width", "height", "log_pixels", "aspect", "bytes_per_pixel"]
  groups = list(names)
  for group, values in (("format", [info.format for info in infos]), ("mode", [info.mode for info in infos])):
    for category in sorted(set(values)):
      columns.append(np.array([value == category for value in values], np.float64))
      names.append(f"{group}={category}")
      groups.append(group)
  columns.append(np.array([q or 0 for q in quality], np.float64))
  columns.append(np.array([q is None for q in quality], np.float64))
  names += ["jpeg_quality", "not_jpeg"]
  groups += ["jpeg_quality", "jpeg_quality"]
  columns.append(np.array([_would_pad(info, crop_size) for info in infos], np.float64))
  names.append("would_pad")
  groups.append("would_pad")
  return np.stack(columns, axis=1), names, groups


def _best_split(x: np.ndarray, y: np.ndarray, num_classes: int, min_leaf: int) -> tuple[int, float] | None:
  """(column, threshold) of the split `x[:, column] <= threshold` with the lowest weighted Gini impurity.

  Thresholds lie halfway between neighbouring distinct values, and both sides keep `min_leaf` records;
  None when no split lowers the impurity.
  """
  n = len(y)
  one_hot = np.eye(num_classes)[y]
  parent = n - (one_hot.sum(0) ** 2).sum() / n  # n * Gini of the node
  best, best_impurity = None, parent - 1e-9
  left_n = np.arange(1, n)
  for column in range(x.shape[1]):
    order = np.argsort(x[:, column], kind="stable")
    values = x[order, column]
    left = np.cumsum(one_hot[order], axis=0)[:-1]
    right = one_hot.sum(0) - left
    impurity = (left_n - (left**2).sum(1) / left_n) + ((n - left_n) - (right**2).sum(1) / (n - left_n))
    valid = (values[1:] > values[:-1]) & (left_n >= min_leaf) & (n - left_n >= min_leaf)
    if not valid.any():
      continue
    i = int(np.argmin(np.where(valid, impurity, np.inf)))
    if impurity[i] < best_impurity:
      best, best_impurity = (column, float((values[i] + values[i + 1]) / 2)), float(impurity[i])
  return best


def fit_tree(x: np.ndarray, y: np.ndarray, num_classes: int, depth: int = TREE_DEPTH, min_leaf: int = MIN_LEAF) -> Any:
  """A Gini decision tree: a class index at a leaf, (column, threshold, left, right) at a node.

  Depth 3 is enough to express "small PNG" or "512-px JPEG of quality 90" and small enough that its
  held-out accuracy on unrelated features stays at chance, which is what the audit needs.
  """
  majority = int(np.bincount(y, minlength=num_classes).argmax()) if len(y) else 0
  if depth == 0 or len(np.unique(y)) < 2:
    return majority
  split = _best_split(x, y, num_classes, min_leaf)
  if split is None:
    return majority
  column, threshold = split
  goes_left = x[:, column] <= threshold
  return (
    column,
    threshold,
    fit_tree(x[goes_left], y[goes_left], num_classes, depth - 1, min_leaf),
    fit_tree(x[~goes_left], y[~goes_left], num_classes, depth - 1, min_leaf),
  )


def predict_tree(tree: Any, x: np.ndarray) -> np.ndarray:
  if not isinstance(tree, tuple):
    return np.full(len(x), tree, np.int64)
  column, threshold, left, right = tree
  goes_left = x[:, column] <= threshold
  predictions = np.empty(len(x), np.int64)
  predictions[goes_left] = predict_tree(left, x[goes_left])
  predictions[~goes_left] = predict_tree(right, x[~goes_left])
  return predictions


def stratified_folds(y: np.ndarray, num_folds: int = NUM_FOLDS, seed: int = 0) -> np.ndarray:
  """int[n] fold of each record: each class dealt round-robin in a seeded shuffled order.

  Deterministic (the same folder gives the same audit) and stratified (every fold has each class's share).
  """
  rng = np.random.default_rng(seed)
  folds = np.empty(len(y), np.int64)
  for label in np.unique(y):
    members = np.flatnonzero(y == label)
    folds[members[rng.permutation(len(members))]] = np.arange(len(members)) % num_folds
  return folds


def cross_validated_accuracy(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  depth: int = TREE_DEPTH,
  min_leaf: int = MIN_LEAF,
  num_folds: int = NUM_FOLDS,
) -> float:
  """Share of records a tree fitted on the other folds classifies correctly."""
  folds = stratified_folds(y, num_folds)
  correct = 0
  for fold in range(num_folds):
    held_out = folds == fold
    tree = fit_tree(x[~held_out], y[~held_out], num_classes, depth, min_leaf)
    correct += int((predict_tree(tree, x[held_out]) == y[held_out]).sum())
  return correct / len(y)


def _range_text(low: float, high: float, unit: str, digits: int) -> str:
  text = f"{low:,.{digits}f}" if low == high else f"{low:,.{digits}f}–{high:,.{digits}f}"
  return f"{text}{unit}"


def _class_description(feature: str, stats: dict[str, Any], crop_size: int) -> str:
  """How one class looks on one feature, e.g. '80–128 px' or '100% PNG'."""
  numeric = {
    "width": ("width", " px", 0),
    "height": ("height", " px", 0),
    "log_pixels": ("pixels", " pixels", 0),
    "aspect": ("aspect", "", 2),
    "bytes_per_pixel": ("bytes_per_pixel", " bytes/px", 2),
  }
  if feature in numeric:
    key, unit, digits = numeric[feature]
    return _range_text(stats[key]["min"], stats[key]["max"], unit, digits)
  if feature in ("format", "mode"):
    return ", ".join(f"{share:.0%} {name}" for name, share in list(stats[feature].items())[:2])
  if feature == "jpeg_quality":
    parts = []
    not_jpeg = 1 - stats["format"].get("JPEG", 0.0)
    if not_jpeg > 0:
      parts.append(f"{not_jpeg:.0%} not JPEG")
    if stats["jpeg_quality"] is not None:
      parts.append("quality " + _range_text(stats["jpeg_quality"]["min"], stats["jpeg_quality"]["max"], "", 0))
    return ", ".join(parts)
  return f"{stats['pad_share']:.0%} smaller than the {crop_size}-px crop"


def _also_separating(
  feature: str, single: dict[str, float], chance: float, pooled: dict[str, dict[str, Any]], crop_size: int
) -> str:
  """ "; width also does (0.93: ...)" for every other feature that alone beats chance by the margin.

  On the public data size and format both give the class away; naming only one would hide the other.
  """
  others = [
    (name, accuracy)
    for name, accuracy in sorted(single.items(), key=lambda item: -item[1])
    if name != feature and accuracy >= chance + SHORTCUT_MARGIN
  ]
  parts = []
  for name, accuracy in others[:3]:
    described = ", ".join(
      f"{class_name} {_class_description(name, stats, crop_size)}"
      for class_name, stats in pooled.items()
      if stats["count"]
    )
    parts.append(f"{dict(_FEATURES)[name]} {accuracy:.2f} ({described})")
  return f"; alone, these also beat chance: {'; '.join(parts)}" if parts else ""


def _finding(
  feature: str,
  single: dict[str, float],
  metadata_accuracy: float,
  chance: float,
  pooled: dict[str, dict[str, Any]],
  crop_size: int,
) -> str:
  """One sentence a person can act on: which feature, how each class looks on it, how well it predicts."""
  label = dict(_FEATURES)[feature]
  feature_accuracy = single[feature]
  per_class = ", ".join(
    f"{name} {_class_description(feature, stats, crop_size)}" for name, stats in pooled.items() if stats["count"]
  )
  if metadata_accuracy < chance + SHORTCUT_MARGIN:
    return (
      f"metadata does not separate the classes: held-out accuracy {metadata_accuracy:.2f} is at chance "
      f"{chance:.2f} (within {SHORTCUT_MARGIN:.2f}; strongest feature {label}, {feature_accuracy:.2f}: "
      f"{per_class})"
    )
  if feature_accuracy >= chance + SHORTCUT_MARGIN:
    return (
      f"{label} alone separates the classes: {per_class} (held-out accuracy {feature_accuracy:.2f} "
      f"vs chance {chance:.2f}){_also_separating(feature, single, chance, pooled, crop_size)}"
    )
  return (
    f"metadata features together separate the classes (held-out accuracy {metadata_accuracy:.2f} vs "
    f"chance {chance:.2f}); the strongest single one, {label}, reaches {feature_accuracy:.2f}: {per_class}"
  )


def _overlap_ranges(pooled: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The [p5, p95] width and height ranges and the formats that every class covers; None where empty."""
  present = [stats for stats in pooled.values() if stats["count"]]
  ranges: dict[str, Any] = {}
  for key in ("width", "height"):
    low = max((stats[key]["p5"] for stats in present), default=0.0)
    high = min((stats[key]["p95"] for stats in present), default=-1.0)
    ranges[key] = [low, high] if len(present) == len(pooled) and low <= high else None
  formats = set.intersection(*(set(stats["format"]) for stats in present)) if present else set()
  ranges["format"] = sorted(formats) if len(present) == len(pooled) else []
  return ranges


def audit_records(records: Sequence[AuditRecord], class_names: Sequence[str], crop_size: int) -> dict[str, Any]:
  """The shortcut audit of readable images: per-class statistics and what metadata alone predicts.

  Cross-validation pools every split: the question is whether the folder as a whole carries a
  shortcut, and a shortcut present in train and test alike is exactly the one a test score hides.
  """
  if not records:
    raise ValueError("no readable images to audit")
  splits = [split for split in SPLITS if any(r.split == split for r in records)]
  splits += sorted({r.split for r in records} - set(splits))
  per_class = {
    split: {
      name: _group_stats([r.info for r in records if r.split == split and r.label == label], crop_size)
      for label, name in enumerate(class_names)
    }
    for split in splits
  }
  pooled = {
    name: _group_stats([r.info for r in records if r.label == label], crop_size)
    for label, name in enumerate(class_names)
  }

  x, _, groups = feature_matrix([r.info for r in records], crop_size)
  y = np.array([r.label for r in records], np.int64)
  num_classes = len(class_names)
  chance = float(np.bincount(y, minlength=num_classes).max() / len(y))
  metadata_accuracy = cross_validated_accuracy(x, y, num_classes)
  single = {
    feature: cross_validated_accuracy(x[:, [g == feature for g in groups]], y, num_classes, depth=1)
    for feature, _ in _FEATURES
  }
  strongest = max(single, key=lambda feature: single[feature])  # first of equals: _FEATURES' order
  return {
    "num_records": len(records),
    "crop_size": crop_size,
    "class_names": list(class_names),
    "per_class": per_class,
    "pooled": pooled,
    "metadata_accuracy": round(metadata_accuracy, 4),
    "chance_accuracy": round(chance, 4),
    "shortcut": bool(metadata_accuracy >= chance + SHORTCUT_MARGIN),
    "strongest_feature": strongest,
    "strongest_feature_accuracy": round(single[strongest], 4),
    "single_feature_accuracy": {feature: round(accuracy, 4) for feature, accuracy in single.items()},
    "finding": _finding(strongest, single, metadata_accuracy, chance, pooled, crop_size),
    "overlap_ranges": _overlap_ranges(pooled),
  }


def overlap_mask(audit: dict[str, Any], infos: Sequence[ImageInfo]) -> np.ndarray:
  """bool[n]: the images that lie where every class's metadata overlaps.

  An image is in the overlap when its width and its height each lie in the intersection of the
  classes' [5th, 95th] percentile ranges (audit["overlap_ranges"], over all splits) and its file
  format occurs in every class. Accuracy on this subset is what a detector scores where size and
  format cannot give the answer away; all False when the classes share no such range.
  """
  ranges = audit["overlap_ranges"]
  if ranges["width"] is None or ranges["height"] is None or not ranges["format"]:
    return np.zeros(len(infos), bool)
  width_low, width_high = ranges["width"]
  height_low, height_high = ranges["height"]
  return np.array(
    [
      width_low <= info.width <= width_high
      and height_low <= info.height <= height_high
      and info.format in ranges["format"]
      for info in infos
    ],
    bool,
  )


def audit_folder(
  data_dir: str, class_names: Sequence[str], crop_size: int, max_pixels: int, cache_path: epath.Path | None = None
) -> dict[str, Any]:
  """Probes <data_dir>/{train,test}/<class>/** and audits the readable images.

  Missing split or class folders are audited as empty rather than refused: the audit is a look at
  whatever is there, and training reports a broken layout itself. Unreadable files are counted only.
  """
  root = epath.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"{data_dir}: no such folder; give a folder holding train/ and test/")
  located = [
    (split, label, str(path))
    for split in SPLITS
    for label, name in enumerate(class_names)
    if (root / split / name).is_dir()
    for path in list_images(root / split / name)
  ]
  if not located:
    raise FileNotFoundError(f"{data_dir}: no images under {{{','.join(SPLITS)}}}/{{{','.join(class_names)}}}/")
  infos = probe_files([path for _, _, path in located], max_pixels, cache_path)
  records = [AuditRecord(split, label, info) for (split, label, _), info in zip(located, infos) if info.ok]
  audit = audit_records(records, class_names, crop_size)
  audit["num_unreadable"] = len(located) - len(records)
  return audit


def summary_lines(audit: dict[str, Any]) -> list[str]:
  """A few lines for the training log; the caller warns loudly when audit["shortcut"] is true."""
  verdict = (
    "SHORTCUT: a detector can score this without learning generator traces"
    if audit["shortcut"]
    else "no metadata shortcut"
  )
  pads = ", ".join(f"{name} {stats['pad_share']:.0%}" for name, stats in audit["pooled"].items() if stats["count"])
  lines = [
    f"Dataset audit: {audit['finding']}",
    f"Metadata-only classifier: held-out accuracy {audit['metadata_accuracy']:.2f} vs chance "
    f"{audit['chance_accuracy']:.2f} ({verdict})",
    f"Zero-padded by the {audit['crop_size']}-px crop: {pads}",
  ]
  if audit.get("num_unreadable"):
    lines.append(f"{audit['num_unreadable']} unreadable file(s) left out of the audit")
  return lines


def _define_flags() -> None:
  """Defined only when run as a program: training imports this module next to others that own --output."""
  flags.DEFINE_string("data_dir", None, "Folder holding train/ and test/, each with one folder per class.")
  flags.DEFINE_string("output", None, "JSON file to write; stdout when unset.")
  flags.DEFINE_integer("crop_size", 224, "Side of the square training crop; smaller images would be padded.")
  flags.DEFINE_list("class_names", ["human-art", "ai-generated"], "Class folder names, in label order.")
  flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Images with more pixels count as unreadable.")
  flags.mark_flag_as_required("data_dir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  options = flags.FLAGS
  try:
    audit = audit_folder(options.data_dir, options.class_names, options.crop_size, options.max_image_pixels)
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  if options.output:
    workdir_module.write_json(epath.Path(options.output), audit)
  else:
    print(json.dumps(audit, indent=2, sort_keys=True))
  for line in summary_lines(audit):
    print(line, file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
