import base64
import html.parser
import io

import numpy as np
from PIL import Image

from flax_detector import binary_metrics, report_html


class _Page(html.parser.HTMLParser):
  """Collects image sources, text and unclosed tags: enough to check the page is well-formed and complete."""

  def __init__(self):
    super().__init__()
    self.images, self.text, self.open_tags = [], [], []

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.images.append(dict(attrs)["src"])
    elif tag not in ("meta", "br"):
      self.open_tags.append(tag)

  def handle_endtag(self, tag):
    assert self.open_tags.pop() == tag

  def handle_data(self, data):
    self.text.append(data)


def _report() -> dict:
  p = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
  y = np.array([0, 0, 1, 1, 1, 0], bool)
  report = binary_metrics.summarize(p, y, 0.5)
  report.update(ece_calibrated=0.0123, temperature=1.7, checkpoint_step=1200, class_names=["human", "ai-generated"])
  report["robustness"] = [
    {"name": "clean", "accuracy": 0.8333, "roc_auc": 0.8889},
    {"name": "jpeg_q50", "accuracy": 0.5, "roc_auc": None},
  ]
  report["audit"] = {
    "finding": "PNG <only> in class ai-generated & more",
    "metadata_accuracy": 0.91,
    "chance_accuracy": 0.5,
    "shortcut": True,
  }
  report["metadata_overlap"] = {"num_examples": 0, "note": "no overlap"}
  return report


def _write_pngs(folder, names) -> None:
  for index, name in enumerate(names):
    Image.fromarray(np.full((8, 12, 3), 40 * index, np.uint8)).save(folder / name)


def test_page_is_self_contained_and_complete(tmp_path):
  names = ["confusion.png", "roc.png", "robustness.png"]
  _write_pngs(tmp_path, names)
  report_html.write_html(tmp_path / "report.html", _report(), names)
  source = (tmp_path / "report.html").read_text()
  page = _Page()
  page.feed(source)
  page.close()
  assert page.open_tags == []
  assert len(page.images) == len(names)
  for src, name in zip(page.images, names):
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == (tmp_path / name).read_bytes()
    Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
  text = " ".join(page.text)
  for expected in (
    "Accuracy",
    "0.8333",
    "Balanced accuracy",
    "ROC AUC",
    "0.0123",
    "1200",
    "true: ai-generated",
    "predicted: human",
    "jpeg_q50",
    "n/a",
    "0.9100",
    "no overlap",
    "PNG <only> in class ai-generated & more",
  ):
    assert expected in text, expected
  assert "<only>" not in source  # escaped, not markup


def test_page_without_optional_sections(tmp_path):
  report = binary_metrics.summarize(np.array([0.2, 0.7]), np.array([1, 1]), 0.5)
  report_html.write_html(tmp_path / "report.html", report, [])
  page = _Page()
  page.feed((tmp_path / "report.html").read_text())
  text = " ".join(page.text)
  assert page.images == [] and "Shortcut audit" not in text and "Robustness" not in text
  assert "Accuracy" in text and "n/a" in text  # the single-class ROC AUC
