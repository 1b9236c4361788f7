import numpy as np
import pytest
from PIL import Image

from flax_detector import binary_metrics, report_figures

CLASSES = ("human", "ai-generated")


def _scores(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  y = rng.random(n) < 0.3
  return 1 / (1 + np.exp(-(rng.normal(size=n) + 2.5 * (y - 0.5)))), y


def _assert_readable_png(path) -> None:
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape[1] > 200 and image.shape[0] > 100
  assert image.std() > 0
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # more than a background and a frame


def _thumbnail(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _draw(name: str, path) -> None:
  p, y = _scores()
  summary = binary_metrics.summarize(p, y, 0.5)
  bins = binary_metrics.reliability_bins(p, y)
  calibrated = 1 / (1 + np.exp(-np.log(p / (1 - p)) / 1.5))
  if name == "confusion":
    report_figures.confusion_matrix_figure(summary["confusion_matrix"], CLASSES, path)
  elif name == "roc":
    report_figures.roc_figure(p, y, path, summary["roc_auc"])
  elif name == "roc_one_class":
    report_figures.roc_figure(p, np.ones_like(y), path, None)
  elif name == "pr":
    report_figures.pr_figure(p, y, path, summary["average_precision"])
  elif name == "pr_one_class":
    report_figures.pr_figure(p, np.zeros_like(y), path, None)
  elif name == "histogram":
    report_figures.score_histogram_figure(p, y, CLASSES, 0.42, path)
  elif name == "reliability":
    report_figures.reliability_figure(
      bins,
      binary_metrics.reliability_bins(calibrated, y),
      path,
      summary["ece"],
      binary_metrics.expected_calibration_error(calibrated, y),
    )
  elif name == "reliability_before_only":
    report_figures.reliability_figure(bins, None, path, summary["ece"], None)
  elif name == "robustness":
    rows = [
      {"name": "clean", "accuracy": 0.93, "roc_auc": 0.97},
      {"name": "jpeg_q50", "accuracy": 0.71, "roc_auc": 0.8},
      {"name": "downscale_0.25", "accuracy": 0.5, "roc_auc": None},
    ]
    report_figures.robustness_figure(rows, path)
  elif name == "mistakes":
    items = [
      (_thumbnail(i), 0.97 - 0.1 * i, CLASSES[i % 2], f"folder/very_long_file_name_number_{i}.png") for i in range(5)
    ]
    report_figures.mistakes_figure(items, path)
  elif name == "no_mistakes":
    report_figures.mistakes_figure([], path)


@pytest.mark.parametrize(
  "name",
  [
    "confusion",
    "roc",
    "roc_one_class",
    "pr",
    "pr_one_class",
    "histogram",
    "reliability",
    "reliability_before_only",
    "robustness",
    "mistakes",
    "no_mistakes",
  ],
)
def test_figure_is_a_readable_png(name, tmp_path):
  path = tmp_path / f"{name}.png"
  _draw(name, path)
  _assert_readable_png(path)


def test_figure_reads_back_for_tensorboard(tmp_path):
  path = tmp_path / "confusion.png"
  _draw("confusion", path)
  image = report_figures.figure_to_tensorboard_image(path)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[:2] == Image.open(path).size[::-1]
