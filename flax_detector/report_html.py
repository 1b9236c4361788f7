"""The evaluation report as one self-contained HTML page.

Figures are embedded as base64 data URIs and the style is inline, so the single file can be mailed,
attached to an issue or copied off a TPU VM and still show everything. All text from the report
(class names, file names, audit findings) is HTML-escaped: it comes from a data folder nobody vetted.
"""

import base64
import html
from collections.abc import Sequence
from typing import Any

from etils import epath

# Headline rows: report key, label. Keys missing from the report are left out; a None value reads "n/a".
HEADLINE = (
  ("accuracy", "Accuracy"),
  ("balanced_accuracy", "Balanced accuracy"),
  ("precision", "Precision (AI)"),
  ("recall", "Recall (AI)"),
  ("f1", "F1 (AI)"),
  ("roc_auc", "ROC AUC"),
  ("average_precision", "Average precision"),
  ("ece", "ECE (before temperature scaling)"),
  ("ece_calibrated", "ECE (after temperature scaling)"),
  ("temperature", "Temperature"),
  ("brier", "Brier score"),
  ("threshold", "Decision threshold on p(AI)"),
  ("checkpoint_step", "Checkpoint step"),
  ("num_examples", "Images"),
)

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.8em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; }
.warning { color: #a00; font-weight: bold; }
"""


def _text(value: Any) -> str:
  """A cell's text: floats to 4 decimals, None as "n/a", everything escaped."""
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4f}"
  return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
  body = "".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _headline(report: dict[str, Any]) -> str:
  return _table(("metric", "value"), [(label, report[key]) for key, label in HEADLINE if key in report])


def _confusion(report: dict[str, Any]) -> str:
  """Rows are true classes, columns predicted classes, as binary_metrics' [[TN, FP], [FN, TP]]."""
  names = report.get("class_names") or [f"class {i}" for i in range(len(report["confusion_matrix"]))]
  rows = [[f"true: {name}", *counts] for name, counts in zip(names, report["confusion_matrix"])]
  return "<h2>Confusion matrix</h2>" + _table(["", *(f"predicted: {name}" for name in names)], rows)


def _robustness(rows: Sequence[dict[str, Any]]) -> str:
  return "<h2>Robustness</h2><p>The whole test set scored again after each perturbation.</p>" + _table(
    ("perturbation", "accuracy", "ROC AUC"), [(row["name"], row.get("accuracy"), row.get("roc_auc")) for row in rows]
  )


def _audit(audit: dict[str, Any]) -> str:
  """The training folder's shortcut audit: can file metadata alone (size, format, ...) tell the classes apart?"""
  css_class = ' class="warning"' if audit.get("shortcut") else ""
  return (
    "<h2>Shortcut audit of the training folder</h2>"
    f"<p{css_class}>{html.escape(str(audit.get('finding', 'no finding recorded')))}</p>"
    + _table(
      ("", "accuracy"),
      [
        ("metadata-only classifier (held out)", audit.get("metadata_accuracy")),
        ("chance (majority class)", audit.get("chance_accuracy")),
      ],
    )
  )


def _metadata_overlap(overlap: dict[str, Any]) -> str:
  """The same audit of the scored images, and the accuracy where their metadata cannot give the answer."""
  css_class = ' class="warning"' if overlap.get("shortcut") else ""
  parts = ["<h2>Where metadata cannot give the answer</h2>"]
  if "finding" in overlap:
    parts.append(f"<p{css_class}>These images: {html.escape(str(overlap['finding']))}</p>")
  rows = [
    (key.replace("_", " "), value)
    for key, value in overlap.items()
    if key not in ("finding", "shortcut") and not isinstance(value, dict)
  ]
  parts.append(_table(("", "value"), rows))
  return "".join(parts)


def _mistakes(mistakes: dict[str, Any]) -> str:
  """The most confident errors by name, and how to read their Grad-CAM grid."""
  return (
    "<h2>Most confident mistakes</h2>"
    f"<p>{html.escape(mistakes['figure'])} shows them; {html.escape(mistakes['gradcam_figure'])} shows the "
    "same images with a Grad-CAM heat map of where the detector found evidence for the positive class "
    f"(red: most; untinted: none, or not seen by any crop). Target: {html.escape(mistakes['gradcam_target'])}."
    "</p>"
    + _table(
      ("file", "true class", "p_ai"), [(item["name"], item["true_class"], item["p_ai"]) for item in mistakes["images"]]
    )
  )


def _figure(path: epath.Path) -> str:
  encoded = base64.b64encode(path.read_bytes()).decode("ascii")
  name = html.escape(path.name)
  return f'<figure><img src="data:image/png;base64,{encoded}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def write_html(path: epath.PathLike, report: dict[str, Any], figure_names: Sequence[str]) -> None:
  """Writes the report page to `path`.

  `report` holds binary_metrics.summarize's keys (plus optional "ece_calibrated", "temperature",
  "checkpoint_step", "class_names", "robustness", "audit", "metadata_overlap" and "mistakes"); `figure_names` are PNG
  files, joined to the page's folder as pathlib joins (an absolute name stands alone), embedded in order.
  """
  path = epath.Path(path)
  title = "Evaluation report"
  if "checkpoint_step" in report:
    title += f", checkpoint step {report['checkpoint_step']}"
  sections = [f"<h1>{html.escape(title)}</h1>", "<h2>Headline numbers</h2>", _headline(report)]
  if "confusion_matrix" in report:
    sections.append(_confusion(report))
  if report.get("robustness"):
    sections.append(_robustness(report["robustness"]))
  if report.get("metadata_overlap"):
    sections.append(_metadata_overlap(report["metadata_overlap"]))
  if report.get("audit"):
    sections.append(_audit(report["audit"]))
  if report.get("mistakes"):
    sections.append(_mistakes(report["mistakes"]))
  if figure_names:
    figures = [_figure(path.parent / name) for name in figure_names]
    sections.append("<h2>Figures</h2>" + "".join(figures))
  page = (
    f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
    f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n"
  )
  path.write_text(page)
