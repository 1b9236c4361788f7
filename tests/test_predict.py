import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flax_detector import evaluate, inference, input_pipeline, predict, report
from flax_detector.data.folder import ImageFolderSource
from flax_detector.data.synthetic import SyntheticSource


def _run_predict(*args):
  return subprocess.run(
    [sys.executable, "-m", "flax_detector.predict", *args], capture_output=True, text=True, timeout=300, check=False
  )


def test_predict_writes_a_row_per_readable_image_and_warns_about_the_rest(trained_workdir, tmp_path):
  source = SyntheticSource("test", 6, 32, 48)
  folder = tmp_path / "images"
  (folder / "nested").mkdir(parents=True)
  expected = []
  for index in range(6):
    path = folder / ("nested" if index % 2 else "") / f"image_{index}.{'png' if index < 3 else 'JPG'}"
    Image.fromarray(source[index][0]).save(path, format="PNG" if index < 3 else "JPEG", quality=95)
    expected.append(str(path))
  (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
  (folder / ".hidden.png").write_bytes(b"ignored")
  single = tmp_path / "single.webp"
  Image.fromarray(source[0][0]).save(single, format="WEBP", lossless=True)
  expected.append(str(single))

  result = _run_predict(f"--workdir={trained_workdir}", str(folder), str(single))
  assert result.returncode == 0, result.stderr
  assert "corrupt.png" in result.stderr
  rows = list(csv.DictReader(io.StringIO(result.stdout)))
  assert result.stdout.splitlines()[0] == "path,p_ai,label"
  assert sorted(row["path"] for row in rows) == sorted(expected)
  assert all(0.0 <= float(row["p_ai"]) <= 1.0 for row in rows)
  threshold = json.loads((trained_workdir / "calibration.json").read_text())["threshold"]
  assert all(row["label"] == ("ai-generated" if float(row["p_ai"]) >= threshold else "human-art") for row in rows)
  assert "\r" not in result.stdout  # LF line endings
  chatter = [line for line in result.stderr.splitlines() if not line.startswith(("warning:", "predict:"))]
  assert not chatter, chatter  # no library log lines without --verbose

  output = tmp_path / "predictions.csv"
  assert _run_predict(f"--workdir={trained_workdir}", f"--output={output}", str(single)).returncode == 0
  with open(output, newline="") as stream:
    assert [row["path"] for row in csv.DictReader(stream)] == [str(single)]


def test_threshold_override_and_unsure_band(trained_workdir, tmp_path):
  image = tmp_path / "one.png"
  Image.fromarray(SyntheticSource("test", 1, 32, 48)[0][0]).save(image)
  p_ai = float(
    list(csv.DictReader(io.StringIO(_run_predict(f"--workdir={trained_workdir}", str(image)).stdout)))[0]["p_ai"]
  )
  below = _run_predict(f"--workdir={trained_workdir}", f"--threshold={min(1.0, p_ai + 0.01)}", str(image))
  above = _run_predict(f"--workdir={trained_workdir}", f"--threshold={max(0.0, p_ai - 0.01)}", str(image))
  unsure = _run_predict(
    f"--workdir={trained_workdir}", f"--unsure={max(0.0, p_ai - 0.01)},{min(1.0, p_ai + 0.01)}", str(image)
  )
  assert below.stdout.splitlines()[1].endswith(",human-art")
  assert above.stdout.splitlines()[1].endswith(",ai-generated")
  assert unsure.stdout.splitlines()[1].endswith(",unsure")
  bad = _run_predict(f"--workdir={trained_workdir}", "--unsure=0.7,0.2", str(image))
  assert bad.returncode == 2 and "--unsure" in bad.stderr


def test_predict_fails_only_when_nothing_is_readable(trained_workdir, tmp_path):
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"nope")
  result = _run_predict(f"--workdir={trained_workdir}", str(broken), str(tmp_path / "missing.png"))
  assert result.returncode != 0
  assert "broken.jpg" in result.stderr and "missing.png" in result.stderr
  assert result.stdout.splitlines() == ["path,p_ai,label"]


def test_predict_without_a_trained_workdir_says_so(tmp_path):
  result = _run_predict(f"--workdir={tmp_path}", str(tmp_path))
  assert result.returncode != 0 and "config.json" in result.stderr


def test_explain_writes_one_overlay_png_per_image_named_after_it(trained_workdir, tmp_path):
  source = SyntheticSource("test", 3, 32, 48)
  sizes = {}
  for index, relative in enumerate(("a/cat.png", "b/cat.jpg", "a/dog.png")):
    path = tmp_path / "in" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(source[index][0]).save(path)
    sizes[str(path)] = source[index][0].shape[1::-1]
  out = tmp_path / "explained"
  result = _run_predict(f"--workdir={trained_workdir}", f"--explain={out}", str(tmp_path / "in"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == "path,p_ai,label,explanation"
  rows = list(csv.DictReader(io.StringIO(result.stdout)))
  assert sorted(path.name for path in out.iterdir()) == ["cat-2.png", "cat.png", "dog.png"]
  for row in rows:
    with Image.open(row["explanation"]) as overlay:
      assert overlay.format == "PNG" and overlay.size == sizes[row["path"]]

  plain = tmp_path / "plain.csv"
  predict.predict(str(trained_workdir), [str(tmp_path / "in")], str(plain), None)
  with open(plain, newline="") as stream:
    plain_p_ai = {row["path"]: float(row["p_ai"]) for row in csv.DictReader(stream)}
  assert {row["path"]: float(row["p_ai"]) for row in rows} == pytest.approx(plain_p_ai, abs=1e-5)


def test_predict_and_evaluate_score_the_pixels_training_evaluated_under_resize(trained_workdir, tmp_path):
  """Under data.preprocess="resize" the input pipeline decodes a large JPEG at reduced scale; predict and
  evaluate must score those pixels too, not a full decode resized afterwards (a train/serve skew)."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["data"]["preprocess"] = "resize"
  (workdir / "config.json").write_text(json.dumps(config))
  folder, rng = tmp_path / "test", np.random.default_rng(0)
  for label in config["data"]["class_names"]:
    (folder / label).mkdir(parents=True)
    for index in range(2):  # 200 px shorter side for 32-px views: libjpeg decodes at 1/4 scale
      small = Image.fromarray(rng.integers(0, 256, (30, 25, 3), dtype=np.uint8))
      small.resize((200, 240), Image.Resampling.BICUBIC).save(folder / label / f"{index}.jpg", quality=90)

  detector = inference.load_detector(workdir)
  source = ImageFolderSource(str(tmp_path), "test", detector.class_names)
  settings = input_pipeline.EvalSettings.from_config(detector.config)
  pipeline_views = list(input_pipeline.eval_dataset(source, settings, 0, 1)[0]["image"][: len(source)])
  full_decode_views = [detector.views(source[index][0]) for index in range(len(source))]
  assert not any(np.array_equal(a, b) for a, b in zip(pipeline_views, full_decode_views))  # the decode matters
  expected_log_probs = detector.log_probs(pipeline_views)
  expected_p_ai = detector.calibration.probabilities(expected_log_probs)[:, detector.positive]

  csv_path = tmp_path / "predictions.csv"
  predict.predict(str(workdir), [str(folder)], str(csv_path), None)
  with open(csv_path, newline="") as stream:
    p_ai = {row["path"]: row["p_ai"] for row in csv.DictReader(stream)}
  assert [p_ai[path] for path in source.paths] == [f"{p:.6f}" for p in expected_p_ai]

  result = evaluate.evaluate(str(workdir), str(folder), str(tmp_path / "report"), with_robustness=False)
  summary = report.summarize_scores(expected_log_probs, source.labels, detector.positive, detector.calibration)
  assert {key: result[key] for key in summary} == summary
