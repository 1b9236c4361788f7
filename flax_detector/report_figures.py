"""The evaluation report's figures, one PNG each, drawn off-screen with matplotlib.

Each function takes plain arrays, writes one PNG and returns nothing, so evaluation can call them in any
order and the trainer can send the same PNGs to TensorBoard (`figure_to_tensorboard_image`). Figures are
built on `matplotlib.figure.Figure` rather than pyplot: no global figure state to leak between calls.
"""

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
from etils import epath

matplotlib.use("Agg")  # off-screen: evaluation runs on machines without a display

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from flax_detector import binary_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

_DPI = 110
_NO_DATA_COLOR = "0.4"


def _save(figure: Figure, path: epath.PathLike) -> None:
  """PNG bytes through etils.epath, so a report folder on gs:// works like a local one."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
  epath.Path(path).write_bytes(buffer.getvalue())


def _message_figure(title: str, message: str, path: epath.PathLike) -> None:
  """A figure that says why there is no plot, so a report never has a silently missing picture."""
  figure = Figure(figsize=(5, 3))
  axes = figure.add_subplot()
  axes.set_title(title)
  axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color=_NO_DATA_COLOR, wrap=True)
  axes.set_xticks([])
  axes.set_yticks([])
  _save(figure, path)


def _format(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def confusion_matrix_figure(
  confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: epath.PathLike
) -> None:
  """Counts with row percentages (the recall of each true class), coloured by the row share."""
  counts = np.asarray(confusion, np.int64)
  totals = counts.sum(axis=1, keepdims=True)
  shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
  figure = Figure(figsize=(4.8, 4.2))
  axes = figure.add_subplot()
  image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
  figure.colorbar(image, ax=axes, label="share of the true class")
  for (row, col), count in np.ndenumerate(counts):
    axes.text(
      col,
      row,
      f"{count}\n({100 * shares[row, col]:.1f}%)",
      ha="center",
      va="center",
      color="white" if shares[row, col] > 0.5 else "black",
      fontsize=12,
    )
  ticks = range(len(class_names))
  axes.set_xticks(ticks, class_names)
  axes.set_yticks(ticks, class_names)
  axes.set_xlabel("predicted class")
  axes.set_ylabel("true class")
  axes.set_title(f"Confusion matrix ({counts.sum()} images)")
  _save(figure, path)


def _two_class_axes(y: np.ndarray, title: str, path: epath.PathLike) -> tuple[Figure, Any] | None:
  """A square figure for a curve that needs both classes; None, after saving a note instead, when one is missing."""
  if y.all() or not y.any():
    _message_figure(title, "undefined: the test set has only one class", path)
    return None
  figure = Figure(figsize=(5, 5))
  return figure, figure.add_subplot()


def _save_curve(figure: Figure, axes: Any, path: epath.PathLike, legend_loc: str, **labels: str) -> None:
  """Unit axes (a little headroom for y = 1), a light grid and the legend, then the PNG."""
  axes.set(xlim=(0, 1), ylim=(0, 1.01), **labels)
  axes.grid(alpha=0.3)
  axes.legend(loc=legend_loc)
  _save(figure, path)


def roc_figure(p: np.ndarray, y: np.ndarray, path: epath.PathLike, auc: float | None) -> None:
  """The ROC curve of p_ai against the chance diagonal; a note instead when one class is missing."""
  y = np.asarray(y).astype(bool)
  if (drawing := _two_class_axes(y, "ROC curve", path)) is None:
    return
  figure, axes = drawing
  fpr, tpr, _ = binary_metrics.roc_curve(p, y)
  axes.plot(fpr, tpr, lw=2, label=f"detector (AUC = {_format(auc)})")
  axes.plot([0, 1], [0, 1], ls="--", color="0.6", label="chance")
  axes.set_aspect("equal")
  _save_curve(
    figure,
    axes,
    path,
    "lower right",
    xlabel="false positive rate (human art called AI)",
    ylabel="true positive rate (AI art caught)",
    title="ROC curve",
  )


def pr_figure(p: np.ndarray, y: np.ndarray, path: epath.PathLike, ap: float | None) -> None:
  """Precision against recall as the step function AP integrates, with the positive share as baseline."""
  y = np.asarray(y).astype(bool)
  if (drawing := _two_class_axes(y, "Precision-recall curve", path)) is None:
    return
  figure, axes = drawing
  precision, recall, _ = binary_metrics.precision_recall_curve(p, y)
  axes.step(recall, precision, where="post", lw=2, label=f"detector (AP = {_format(ap)})")
  axes.axhline(y.mean(), ls="--", color="0.6", label=f"chance (positive share {y.mean():.2f})")
  _save_curve(
    figure,
    axes,
    path,
    "lower left",
    xlabel="recall (AI art caught)",
    ylabel="precision (AI calls that are right)",
    title="Precision-recall curve, positive class = AI",
  )


def score_histogram_figure(
  p: np.ndarray, y: np.ndarray, class_names: Sequence[str], threshold: float, path: epath.PathLike
) -> None:
  """Histograms of p_ai per true class and the decision threshold: shows overlap and where errors come from."""
  p = np.asarray(p, np.float64)
  y = np.asarray(y).astype(bool)
  figure = Figure(figsize=(6.5, 4))
  axes = figure.add_subplot()
  bins = np.linspace(0, 1, 41)
  for label, name in ((False, class_names[0]), (True, class_names[1])):
    axes.hist(p[y == label], bins=bins, alpha=0.6, label=f"true: {name} ({np.sum(y == label)})")
  axes.axvline(threshold, color="black", ls="--", label=f"threshold = {threshold:.3f}")
  axes.set(xlim=(0, 1), xlabel=f"p({class_names[1]})", ylabel="images", title="Scores by true class")
  axes.legend()
  _save(figure, path)


def reliability_figure(
  bins_before: binary_metrics.ReliabilityBins,
  bins_after: binary_metrics.ReliabilityBins | None,
  path: epath.PathLike,
  ece_before: float,
  ece_after: float | None,
) -> None:
  """Accuracy against confidence per bin, before and (if fitted) after temperature scaling.

  Points on the diagonal are calibrated; below it the model is over-confident. Marker area grows with the
  bin's count, so a far-off point backed by three images does not look like a systematic problem.
  """
  figure = Figure(figsize=(5.5, 5.5))
  axes = figure.add_subplot()
  axes.plot([0, 1], [0, 1], ls="--", color="0.6", label="perfect calibration")
  curves = [(bins_before, f"before (ECE = {_format(ece_before)})", "o")]
  if bins_after is not None:
    curves.append((bins_after, f"after temperature scaling (ECE = {_format(ece_after)})", "s"))
  for bins, label, marker in curves:
    filled = bins.count > 0
    (line,) = axes.plot(bins.confidence[filled], bins.accuracy[filled], lw=1.5, label=label)
    sizes = 20 + 200 * bins.count[filled] / max(1, bins.count.max())
    axes.scatter(bins.confidence[filled], bins.accuracy[filled], s=sizes, marker=marker, color=line.get_color())
  lowest = min(0.5, float(bins_before.edges[np.argmax(bins_before.count > 0)]))
  axes.set(
    xlim=(lowest, 1.02),
    ylim=(min(lowest, 0.4), 1.04),
    xlabel="confidence (probability of the predicted class)",
    ylabel="accuracy",
    title="Reliability (marker size: images per bin)",
  )
  axes.grid(alpha=0.3)
  axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12))
  _save(figure, path)


def robustness_figure(rows: Sequence[dict[str, Any]], path: epath.PathLike) -> None:
  """Accuracy and ROC AUC per perturbation, grouped, "clean" first, with the clean accuracy as a reference line."""
  names = [row["name"] for row in rows]
  positions = np.arange(len(rows))
  figure = Figure(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
  axes = figure.add_subplot()
  width = 0.38
  for offset, key, label in ((-width / 2, "accuracy", "accuracy"), (width / 2, "roc_auc", "ROC AUC")):
    values = [math.nan if row.get(key) is None else row[key] for row in rows]
    bars = axes.bar(positions + offset, values, width, label=label)
    axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8, padding=2)
    for position, value in zip(positions + offset, values):
      if math.isnan(value):
        axes.text(position, 0.02, "n/a", ha="center", fontsize=8, color=_NO_DATA_COLOR)
  if rows and rows[0].get("accuracy") is not None:
    axes.axhline(rows[0]["accuracy"], color="0.3", ls=":", lw=1, label=f"{names[0]} accuracy")
  axes.set_xticks(positions, names, rotation=30, ha="right")
  axes.set(
    xlim=(-0.6, len(rows) - 0.4),
    ylim=(0, 1.12),
    ylabel="score",
    xlabel="perturbation of every test image",
    title="Robustness to re-compression, resizing and blur",
  )
  axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
  _save(figure, path)


def mistakes_figure(
  items: Sequence[tuple[np.ndarray, float, str, str]],
  path: epath.PathLike,
  columns: int = 4,
  title: str = "Most confident mistakes",
) -> None:
  """A grid of the most confident errors, titled "true: X, p_ai=0.97" and the file name.

  Looking at them is the quickest way to spot label noise or a shortcut (watermarks, borders, one artist);
  the same grid of Grad-CAM overlays shows where in each image the detector found its evidence.
  """
  if not items:
    _message_figure(title, "no mistakes", path)
    return
  columns = min(columns, len(items))
  rows = math.ceil(len(items) / columns)
  figure = Figure(figsize=(3 * columns, 3.3 * rows))
  figure.suptitle(title)
  for index, (thumbnail, p_ai, true_name, file_name) in enumerate(items):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.imshow(thumbnail)
    short_name = file_name if len(file_name) <= 28 else "..." + file_name[-25:]
    axes.set_title(f"true: {true_name}, p_ai={p_ai:.2f}\n{short_name}", fontsize=9)
    axes.axis("off")
  _save(figure, path)


def figure_to_tensorboard_image(path: epath.PathLike) -> np.ndarray:
  """A written figure as uint8[H, W, 3]; add a leading batch axis for CLU's `writer.write_images`."""
  with epath.Path(path).open("rb") as file:
    return np.asarray(Image.open(file).convert("RGB"))
