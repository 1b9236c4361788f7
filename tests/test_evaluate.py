"""evaluate: the report's numbers agree with scikit-learn on predict's CSV for the same folder."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk_metrics

from flax_detector import evaluate, predict, robustness
from flax_detector.data.synthetic import SyntheticSource

CLASSES = ("human-art", "ai-generated")


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("labelled") / "test"
  source = SyntheticSource("test", 24, 32, 48)
  for index in range(len(source)):
    image, label = source[index]
    (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if index % 3 else "JPEG"
    Image.fromarray(image).save(folder / CLASSES[label] / f"{index}.{fmt.lower()}", format=fmt, quality=95)
  (folder / CLASSES[0] / "broken.png").write_bytes(b"not an image")
  return folder


def test_report_agrees_with_sklearn_on_predicts_csv(trained_workdir, labelled_folder, tmp_path):
  out = tmp_path / "report"
  result = evaluate.evaluate(str(trained_workdir), str(labelled_folder), str(out), with_robustness=True)
  csv_path = tmp_path / "predictions.csv"
  predict.predict(str(trained_workdir), [str(labelled_folder)], str(csv_path), None)
  with open(csv_path, newline="") as stream:
    rows = list(csv.DictReader(stream))
  p_ai = np.array([float(row["p_ai"]) for row in rows])
  is_ai = np.array(["/ai-generated/" in row["path"] for row in rows])
  predicted = np.array([row["label"] == "ai-generated" for row in rows])

  assert result["num_examples"] == len(rows) == 24  # the broken file counts nowhere
  assert result["accuracy"] == pytest.approx(sk_metrics.accuracy_score(is_ai, predicted))
  assert result["balanced_accuracy"] == pytest.approx(sk_metrics.balanced_accuracy_score(is_ai, predicted))
  assert result["f1"] == pytest.approx(sk_metrics.f1_score(is_ai, predicted, zero_division=0))
  assert result["roc_auc"] == pytest.approx(sk_metrics.roc_auc_score(is_ai, p_ai), abs=1e-4)
  assert result["average_precision"] == pytest.approx(sk_metrics.average_precision_score(is_ai, p_ai), abs=1e-3)
  assert result["brier"] == pytest.approx(sk_metrics.brier_score_loss(is_ai, p_ai), abs=1e-5)
  assert result["confusion_matrix"] == sk_metrics.confusion_matrix(is_ai, predicted).tolist()
  calibration = json.loads((trained_workdir / "calibration.json").read_text())
  assert result["threshold"] == calibration["threshold"] and result["temperature"] == calibration["temperature"]

  overlap = result["metadata_overlap"]  # both classes share sizes and formats here: the overlap is not empty
  assert overlap["shortcut"] is False and 0 < overlap["num_examples"] <= 24 and 0.0 <= overlap["accuracy"] <= 1.0
  names = [row["name"] for row in result["robustness"]]
  assert names == ["clean", *robustness.PERTURBATIONS]  # test_robustness pins the perturbations and their order
  assert result["robustness"][0]["accuracy"] == result["accuracy"]
  assert all(0.0 <= row["accuracy"] <= 1.0 for row in result["robustness"])
  assert json.loads((out / "report.json").read_text())["accuracy"] == result["accuracy"]
  html = (out / "report.html").read_text()
  for name in (
    "confusion_matrix",
    "roc",
    "pr",
    "score_histogram",
    "reliability",
    "robustness",
    "mistakes",
    "mistakes_gradcam",
  ):
    with Image.open(out / f"{name}.png") as figure:
      assert figure.size[0] > 200
  assert html.count("data:image/png;base64,") == 8
  wrong = result["confusion_matrix"][0][1] + result["confusion_matrix"][1][0]
  mistakes = result["mistakes"]
  assert mistakes["gradcam_figure"] == "mistakes_gradcam.png" and len(mistakes["images"]) == min(12, wrong)
  assert all(item["name"] in html for item in mistakes["images"])


def test_without_a_data_dir_the_runs_test_split_is_scored(trained_workdir, tmp_path):
  result = evaluate.evaluate(str(trained_workdir), output_dir=str(tmp_path), with_robustness=False)
  final = json.loads((trained_workdir / "final_metrics.json").read_text())
  assert result["num_examples"] == final["num_examples"]
  assert result["accuracy"] == pytest.approx(final["calibrated"]["accuracy"])
  assert result["roc_auc"] == pytest.approx(final["calibrated"]["roc_auc"], abs=1e-6)


def test_training_writes_calibration_and_test_figures_to_tensorboard(trained_workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  calibration = json.loads((trained_workdir / "calibration.json").read_text())
  assert calibration["fitted_on"] == "validation" and calibration["temperature"] > 0
  assert 0.0 <= calibration["threshold"] <= 1.0
  assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
  accumulator = event_accumulator.EventAccumulator(str(trained_workdir), size_guidance={"tensors": 0})
  accumulator.Reload()
  tags = set(accumulator.Tags()["tensors"])
  assert {f"test/{name}" for name in ("confusion_matrix", "roc", "pr", "score_histogram", "reliability")} <= tags


def test_metadata_check_says_when_the_classes_never_share_sizes():
  from flax_detector.data.probe import ImageInfo  # pylint: disable=g-import-not-at-top

  infos = [ImageInfo(f"{i}.png", 1000, 0.0, 60 + i % 7, 60 + i % 5, "PNG", "RGB") for i in range(20)]
  infos += [ImageInfo(f"{i}.jpg", 9000, 0.0, 500 + i % 7, 512, "JPEG", "RGB", 90) for i in range(20)]
  labels = np.array([0] * 20 + [1] * 20)
  evaluation = evaluate.EvaluationSet(source=None, infos=infos, description="confounded")
  check = evaluate._metadata_check(evaluation, np.arange(40), labels, np.ones(40, bool), CLASSES, 64)
  assert check["shortcut"] is True and check["num_examples"] == 0 and "cannot be separated" in check["note"]
