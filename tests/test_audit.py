import json
import subprocess
import sys

import numpy as np
from PIL import Image

from flax_detector import audit
from flax_detector.data.probe import ImageInfo

CLASSES = ("human-art", "ai-generated")


def _save(path, width, height, image_format, rng):
  """Noise of the same kind for every class, so only the metadata can differ between them."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  if image_format == "JPEG":
    Image.fromarray(pixels).save(path, format="JPEG", quality=int(rng.integers(70, 96)))
  else:
    Image.fromarray(pixels).save(path, format="PNG")


def _confounded_folder(root, per_class=20):
  """The public data's trap in small: human PNGs of 80-128 px, AI JPEGs of 256x256."""
  rng = np.random.default_rng(0)
  for split in audit.SPLITS:
    for index in range(per_class):
      _save(
        root / split / "human-art" / f"h{index}.png", int(rng.integers(80, 129)), int(rng.integers(80, 129)), "PNG", rng
      )
      _save(root / split / "ai-generated" / f"a{index}.jpg", 256, 256, "JPEG", rng)
  return root


def test_size_confounded_folder_is_flagged_as_a_shortcut(tmp_path):
  result = audit.audit_folder(str(_confounded_folder(tmp_path / "data")), CLASSES, 224, 10**7)
  assert result["shortcut"] is True
  assert result["metadata_accuracy"] >= 0.9
  assert result["chance_accuracy"] == 0.5
  assert result["num_records"] == 80 and result["num_unreadable"] == 0
  assert result["strongest_feature"] in ("width", "height", "log_pixels", "format", "would_pad")
  assert result["strongest_feature_accuracy"] >= 0.9
  assert result["finding"].startswith(dict(audit._FEATURES)[result["strongest_feature"]] + " alone separates")
  assert "human-art" in result["finding"] and "ai-generated" in result["finding"]
  human, ai = result["per_class"]["train"]["human-art"], result["per_class"]["train"]["ai-generated"]
  assert human["count"] == ai["count"] == 20
  assert human["format"] == {"PNG": 1.0} and ai["format"] == {"JPEG": 1.0}
  assert human["pad_share"] == 1.0 and ai["pad_share"] == 0.0
  assert ai["width"] == {"min": 256.0, "p5": 256.0, "median": 256.0, "p95": 256.0, "max": 256.0}
  assert human["jpeg_quality"] is None and 70 <= ai["jpeg_quality"]["min"] <= ai["jpeg_quality"]["max"] <= 95
  assert set(human) >= {"aspect", "bytes_per_pixel", "height", "mode"}
  lines = audit.summary_lines(result)
  assert 2 <= len(lines) <= 4 and "SHORTCUT" in lines[1]
  json.dumps(result)  # JSON-able
  # The sizes do not overlap: no image is where metadata cannot tell the classes apart.
  assert result["overlap_ranges"]["width"] is None
  assert not audit.overlap_mask(result, [ImageInfo("x", 1, 0.0, 100, 100, "PNG", "RGB")]).any()


def test_same_metadata_distribution_is_not_a_shortcut(tmp_path):
  rng = np.random.default_rng(1)
  for split in audit.SPLITS:
    for name in CLASSES:
      for index in range(25):
        image_format = "JPEG" if rng.random() < 0.5 else "PNG"
        _save(
          tmp_path / split / name / f"{index}.{image_format.lower()}",
          int(rng.integers(64, 161)),
          int(rng.integers(64, 161)),
          image_format,
          rng,
        )
  result = audit.audit_folder(str(tmp_path), CLASSES, 112, 10**7)
  assert result["shortcut"] is False
  assert result["metadata_accuracy"] < result["chance_accuracy"] + audit.SHORTCUT_MARGIN
  assert result["finding"].startswith("metadata does not separate the classes")
  assert "no metadata shortcut" in audit.summary_lines(result)[1]


def _info(side, image_format="PNG"):
  return ImageInfo(
    f"{side}.{image_format}", side * side, 0.0, side, side, image_format, "RGB", 90 if image_format == "JPEG" else None
  )


def test_overlap_mask_selects_images_inside_the_shared_ranges():
  # Class 0: 100..200 px PNG, class 1: 150..250 px PNG and JPEG, in steps of 5 (21 images each), so the
  # 5th/95th percentiles are exactly the second and second-to-last sides.
  records = [audit.AuditRecord("train", 0, _info(side)) for side in range(100, 201, 5)]
  records += [audit.AuditRecord("test", 1, _info(side, "JPEG" if side % 2 else "PNG")) for side in range(150, 251, 5)]
  result = audit.audit_records(records, CLASSES, 224)
  assert result["overlap_ranges"] == {"width": [155.0, 195.0], "height": [155.0, 195.0], "format": ["PNG"]}
  queries = [
    _info(160),
    _info(155),
    _info(195),
    _info(150),
    _info(200),
    _info(165, "JPEG"),
    ImageInfo("tall", 1, 0.0, 160, 200, "PNG", "RGB"),
  ]
  assert audit.overlap_mask(result, queries).tolist() == [True, True, True, False, False, False, False]

  apart = [audit.AuditRecord("train", 0, _info(100)) for _ in range(10)]
  apart += [audit.AuditRecord("train", 1, _info(120)) for _ in range(10)]
  separated = audit.audit_records(apart, CLASSES, 224)
  assert separated["overlap_ranges"]["width"] is None
  assert not audit.overlap_mask(separated, [_info(100), _info(110), _info(120)]).any()


def _run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "flax_detector.audit", *args], capture_output=True, text=True, timeout=120, check=False
  )


def test_cli_writes_json_and_refuses_a_missing_folder(tmp_path):
  data = _confounded_folder(tmp_path / "data", per_class=8)
  (data / "train" / "human-art" / "broken.png").write_bytes(b"\x89PNG broken")
  output = tmp_path / "audit.json"
  result = _run_cli(f"--data_dir={data}", f"--output={output}", "--crop_size=224")
  assert result.returncode == 0, result.stderr
  written = json.loads(output.read_text())
  assert written["num_records"] == 32 and written["num_unreadable"] == 1 and written["shortcut"] is True
  assert "Dataset audit:" in result.stderr

  missing = _run_cli(f"--data_dir={tmp_path / 'nowhere'}")
  assert missing.returncode == 2
  assert len(missing.stderr.strip().splitlines()) == 1 and "nowhere" in missing.stderr
  assert "Traceback" not in missing.stderr


def test_tree_is_at_chance_on_random_features_and_learns_a_real_one():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 6))
  y = rng.integers(0, 2, 400)
  assert abs(audit.cross_validated_accuracy(x, y, 2) - np.bincount(y).max() / 400) < 0.08
  assert abs(audit.cross_validated_accuracy(x, y, 2, depth=1) - 0.5) < 0.08
  assert audit.cross_validated_accuracy(x, (x[:, 3] > 0.2).astype(np.int64), 2) >= 0.97
  folds = audit.stratified_folds(y)
  assert np.array_equal(folds, audit.stratified_folds(y))  # deterministic
  for fold in range(audit.NUM_FOLDS):
    assert abs(y[folds == fold].mean() - y.mean()) < 0.02  # stratified
