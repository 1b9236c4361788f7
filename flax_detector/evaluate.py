"""An evaluation report a person can trust: `python -m flax_detector.evaluate --workdir=DIR [--data_dir=FOLDER]`.

Scores a folder (one subfolder per class name, e.g. DATA/test; default: the run's own test split) with
the run's newest usable checkpoint and its validation-fitted calibration, and writes OUT (default
DIR/report/): report.json with exact metrics over every image, PNG figures, one self-contained
report.html, a robustness table (the same images re-compressed, down-scaled and blurred), the training
folder's shortcut audit, and the same audit of the scored images with the accuracy where their classes'
sizes and formats overlap, because only there does accuracy measure the detector rather than the files.
The most confident mistakes are shown twice: as they are, and with a Grad-CAM overlay (gradcam.py) of
where the detector found its evidence for the positive class.
"""

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath
from PIL import Image

from flax_detector import (
  audit,
  compilation,
  errors,
  gradcam,
  host_allocator,
  inference,
  input_pipeline,
  report,
  report_figures,
  report_html,
  robustness,
)
from flax_detector import workdir as workdir_layout
from flax_detector.data.decode import read_or_skip
from flax_detector.data.folder import DEFAULT_MAX_IMAGE_PIXELS, ImageFolderSource, IndexOptions
from flax_detector.data.probe import ImageInfo, printable
from flax_detector.data.sources import ImageSource

NUM_MISTAKES = 12
THUMBNAIL_SIDE = 192
MISTAKES_FIGURE = "mistakes.png"
GRADCAM_FIGURE = "mistakes_gradcam.png"
GRADCAM_TARGET = (
  "log-odds of the positive class, from the last conv stage (ReLU before the final max pool); "
  "views' maps placed at their crop offsets and averaged; each overlay scaled to its own maximum"
)


@dataclasses.dataclass(frozen=True)
class EvaluationSet:
  """The images to score, and their file facts where they are files (for PNG->JPEG and the overlap)."""

  source: ImageSource
  infos: list[ImageInfo] | None
  description: str


def load_evaluation_set(detector: inference.Detector, workdir: epath.Path, data_dir: str | None) -> EvaluationSet:
  """FOLDER/<class>/... when given, else the run's test split (image folder, prepared copy or synthetic)."""
  config = detector.config
  if data_dir:
    folder = os.path.abspath(data_dir) if not workdir_layout.is_url(data_dir) else data_dir.rstrip("/")
    options = IndexOptions(max_image_pixels=config.data.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    source = ImageFolderSource(os.path.dirname(folder), os.path.basename(folder), config.data.class_names, options)
    return EvaluationSet(source, source.infos, printable(folder))
  test = input_pipeline.load_split(input_pipeline.SourceSettings.from_config(config), "test", workdir)
  infos = test.infos if isinstance(test, ImageFolderSource) else None
  return EvaluationSet(test, infos, f"the run's test split ({config.data.dir or 'built-in synthetic set'})")


def _score(
  detector: inference.Detector,
  evaluation: EvaluationSet,
  label: str,
  perturb: Callable[[np.ndarray, str], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
  """(record indices scored, log-probabilities) for every readable record, optionally perturbed first."""

  # The clean pass decodes as training's evaluation did (detector.decoded_side); a perturbation applies to
  # the file's own pixels, so a perturbed pass decodes them in full.
  shorter_side = detector.decoded_side if perturb is None else None

  def load_image(index: int) -> np.ndarray | None:
    # A file that changed since it was indexed is left out of the report with a warning.
    image = read_or_skip(lambda: evaluation.source.image(index, shorter_side), "it is left out of the report")
    if image is None:
      return None
    if perturb is not None:
      image_format = evaluation.infos[index].format if evaluation.infos else "PNG"
      image = perturb(image, image_format)
    return image

  indices, log_probs = [], []
  for batch in inference.stream_scores(detector, range(len(evaluation.source)), load_image, label):
    indices.extend(batch.items)
    log_probs.append(batch.log_probs)
  return np.asarray(indices, np.int64), np.concatenate(log_probs)


def _metadata_check(
  evaluation: EvaluationSet,
  indices: np.ndarray,
  labels: np.ndarray,
  correct: np.ndarray,
  class_names: Sequence[str],
  crop_size: int,
) -> dict[str, Any]:
  """Does this folder's metadata give the labels away, and how accurate is the detector where it cannot?

  The audit runs on the scored images themselves: the overlap is where both of *these* classes have
  the same sizes and formats, so accuracy there measures the detector and not the files.
  """
  if evaluation.infos is None:
    return {"num_examples": 0, "note": "the evaluated images are not files, so their metadata is unknown"}
  infos = [evaluation.infos[index] for index in indices]
  folder_audit = audit.audit_records(
    [audit.AuditRecord("evaluated", int(label), info) for label, info in zip(labels, infos)], class_names, crop_size
  )
  inside = audit.overlap_mask(folder_audit, infos)
  check = {
    key: folder_audit[key] for key in ("metadata_accuracy", "chance_accuracy", "shortcut", "finding", "overlap_ranges")
  }
  if not inside.any():
    return {
      **check,
      "num_examples": 0,
      "note": "no image of this folder lies where the classes' sizes and formats overlap, so its accuracy "
      "cannot be separated from what the metadata gives away",
    }
  return {**check, "num_examples": int(inside.sum()), "accuracy": float(correct[inside].mean())}


@dataclasses.dataclass(frozen=True)
class Mistake:
  """A confidently wrong image: the decoded image, its calibrated p_ai, its true class and its file."""

  image: np.ndarray
  p_ai: float
  true_class: str
  name: str


def _mistakes(
  evaluation: EvaluationSet,
  indices: np.ndarray,
  p_ai: np.ndarray,
  is_ai: np.ndarray,
  detector: inference.Detector,
) -> list[Mistake]:
  """The detector's most confident errors, most confident first, each image decoded as the detector saw it."""
  threshold, class_names, positive = detector.calibration.threshold, detector.class_names, detector.positive
  wrong = np.flatnonzero((p_ai >= threshold) != is_ai)
  confidence = np.abs(p_ai[wrong] - threshold)
  negative = 1 - positive
  mistakes = []
  for position in wrong[np.argsort(-confidence, kind="stable")][:NUM_MISTAKES]:
    record = int(indices[position])
    image, label = evaluation.source.image(record, detector.decoded_side), int(evaluation.source.labels[record])
    mistakes.append(
      Mistake(
        image,
        float(p_ai[position]),
        class_names[positive if label == positive else negative],
        printable(evaluation.source.keys[record]),
      )
    )
  return mistakes


def _gradcam_overlays(detector: inference.Detector, images: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Each image with its Grad-CAM for the positive class blended in (the same maps as predict --explain)."""
  overlays = []
  for start in range(0, len(images), detector.batch_size):
    chunk = images[start : start + detector.batch_size]
    _, view_cams = detector.explain([detector.views(image) for image in chunk])
    overlays.extend(
      gradcam.overlay(image, detector.heatmap(cams, image.shape[:2])) for image, cams in zip(chunk, view_cams)
    )
  return overlays


def _thumbnail(image: np.ndarray) -> np.ndarray:
  thumbnail = Image.fromarray(image)
  thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
  return np.asarray(thumbnail)


def _mistake_figures(detector: inference.Detector, mistakes: Sequence[Mistake], out: epath.Path) -> dict[str, Any]:
  """mistakes.png and mistakes_gradcam.png (the same grid with Grad-CAM overlays); report.json's "mistakes"."""

  def grid(images: Sequence[np.ndarray], name: str, title: str) -> None:
    report_figures.mistakes_figure(
      [(_thumbnail(image), mistake.p_ai, mistake.true_class, mistake.name) for image, mistake in zip(images, mistakes)],
      out / name,
      title=title,
    )

  grid([mistake.image for mistake in mistakes], MISTAKES_FIGURE, "Most confident mistakes")
  grid(
    _gradcam_overlays(detector, [mistake.image for mistake in mistakes]),
    GRADCAM_FIGURE,
    f"Most confident mistakes: evidence for {detector.config.data.positive_class} (Grad-CAM)",
  )
  return {
    "figure": MISTAKES_FIGURE,
    "gradcam_figure": GRADCAM_FIGURE,
    "gradcam_target": GRADCAM_TARGET,
    "images": [{"name": m.name, "true_class": m.true_class, "p_ai": m.p_ai} for m in mistakes],
  }


def _robustness_rows(detector: inference.Detector, evaluation: EvaluationSet, clean: dict[str, Any]) -> list[dict]:
  rows = [{"name": "clean", "accuracy": clean["accuracy"], "roc_auc": clean["roc_auc"]}]
  for name, perturb in robustness.PERTURBATIONS.items():
    indices, log_probs = _score(detector, evaluation, name, perturb)
    labels = evaluation.source.labels[indices]
    summary = report.summarize_scores(log_probs, labels, detector.positive, detector.calibration)
    rows.append({"name": name, "accuracy": summary["accuracy"], "roc_auc": summary["roc_auc"]})
  return rows


def evaluate(
  workdir: str, data_dir: str | None = None, output_dir: str | None = None, with_robustness: bool = True
) -> dict[str, Any]:
  """Writes the report into output_dir (default DIR/report) and returns report.json's content."""
  workdir_path = epath.Path(workdir)
  out = epath.Path(output_dir) if output_dir else workdir_path / workdir_layout.REPORT
  detector = inference.load_detector(workdir_path)
  evaluation = load_evaluation_set(detector, workdir_path, data_dir)
  names, positive = detector.class_names, detector.positive
  indices, log_probs = _score(detector, evaluation, "clean", None)
  labels = evaluation.source.labels[indices]
  summary = report.summarize_scores(log_probs, labels, positive, detector.calibration)
  p_ai = detector.calibration.probabilities(log_probs)[:, positive]
  correct = (p_ai >= detector.calibration.threshold) == (labels == positive)
  result = {
    **summary,
    "checkpoint_step": detector.step,
    "class_names": names,
    "data": evaluation.description,
    "positive_class": names[positive],
    "robustness": _robustness_rows(detector, evaluation, summary) if with_robustness else [],
  }
  result["metadata_overlap"] = _metadata_check(evaluation, indices, labels, correct, names, detector.config.image_size)
  if (workdir_path / workdir_layout.AUDIT).exists():
    result["audit"] = workdir_layout.read_json(workdir_path / workdir_layout.AUDIT)  # the training folder's
  figures = report.write_score_figures(out, log_probs, labels, positive, names, detector.calibration, summary)
  if with_robustness:
    report_figures.robustness_figure(result["robustness"], out / "robustness.png")
    figures.append("robustness.png")
  mistakes = _mistakes(evaluation, indices, p_ai, labels == positive, detector)
  result["mistakes"] = _mistake_figures(detector, mistakes, out)
  figures += [MISTAKES_FIGURE, GRADCAM_FIGURE]
  workdir_layout.write_json(out / "report.json", result)
  report_html.write_html(out / "report.html", result, figures)
  return result


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.")
  flags.DEFINE_string(
    "data_dir", None, "Folder with one subfolder per class name (e.g. DATA/test); default: the run's own test split."
  )
  flags.DEFINE_string("output_dir", None, "Where the report goes; default DIR/report/.")
  flags.DEFINE_bool(
    "robustness",
    True,
    "Also re-score every image under JPEG, down-scaling and blur perturbations (seven more passes over the folder).",
  )
  flags.DEFINE_bool("verbose", False, "Show library log lines on stderr.")
  flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_allocator.keep_freed_memory_mapped()  # before JAX starts
  compilation.keep_compiled_programs()
  compilation.generate_cpu_code_at_o2()
  if not FLAGS.verbose:
    inference.quiet_library_logs()
  try:
    with errors.as_user_errors():
      result = evaluate(FLAGS.workdir, FLAGS.data_dir, FLAGS.output_dir, FLAGS.robustness)
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  out = FLAGS.output_dir or os.path.join(FLAGS.workdir, workdir_layout.REPORT)
  print(
    f"accuracy {result['accuracy']:.4f}, balanced {result['balanced_accuracy']:.4f}, ROC AUC "
    f"{result['roc_auc']}, ECE {result['ece']:.4f} -> {result['ece_calibrated']:.4f} calibrated, on "
    f"{result['num_examples']} images; report in {os.path.join(out, 'report.html')}",
    file=sys.stderr,
  )


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main)
