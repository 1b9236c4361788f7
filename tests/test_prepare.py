import json
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flax_detector import input_pipeline, prepare
from flax_detector.data.array_record import ArrayRecordImageSource, decode_record, encode_record, is_prepared
from flax_detector.data.folder import ImageFolderSource

CLASSES = ("human-art", "ai-generated")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}


def _save(path, seed, mode="RGB"):
  """A small noisy image (noise so that lossy formats and crops give distinct pixels)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (int(rng.integers(34, 50)), int(rng.integers(34, 50)), len(mode)), np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels, mode).save(path, format=FORMATS[path.suffix.lower()])


def _make_folder(root, per_class, with_corrupt=False):
  """Both splits, both classes, three formats, nested folders, a hidden file; optionally a corrupt file."""
  seed = 0
  for split, count in per_class.items():
    for name in CLASSES:
      for index in range(count):
        nested = ("sub/deeper/" if index % 3 == 1 else "") + ("b/" if index % 3 == 2 else "")
        suffix = (".png", ".JPG", ".webp")[index % 3]
        _save(root / split / name / f"{nested}img{index:02d}{suffix}", seed, "RGBA" if index == 3 else "RGB")
        seed += 1
      (root / split / name / ".hidden.png").write_bytes(b"ignored")
  if with_corrupt:
    (root / "train/ai-generated/sub/corrupt.png").write_bytes(b"\x89PNG truncated")
  return root


def _readable(source, skip=()):
  return [index for index, key in enumerate(source.keys) if key not in skip]


def test_record_round_trip_keeps_the_bytes():
  data = bytes(range(256)) * 3
  assert decode_record(encode_record("train/human-art/é/a.png", 1, data)) == ("train/human-art/é/a.png", 1, data)
  with pytest.raises(ValueError, match="not a flax_detector image record"):
    decode_record(b"PNG....")


def test_default_shard_count_is_about_one_per_thousand_images():
  assert [prepare.default_num_shards(n) for n in (1, 499, 1400, 1600, 22000)] == [1, 1, 1, 2, 22]


def test_prepared_copy_matches_the_folder_and_skips_unreadable_files(tmp_path, caplog):
  src = _make_folder(tmp_path / "src", {"train": 5, "test": 3}, with_corrupt=True)
  dst = tmp_path / "prepared"
  with caplog.at_level(logging.WARNING):
    manifest = prepare.prepare(str(src), str(dst), CLASSES, num_shards=2)
  corrupt = "train/ai-generated/sub/corrupt.png"
  assert corrupt in caplog.text
  assert manifest["splits"]["train"]["skipped"] == [corrupt] and manifest["splits"]["test"]["skipped"] == []
  assert manifest["splits"]["train"]["counts"] == {"human-art": 5, "ai-generated": 5}
  assert json.loads((dst / "prepared.json").read_text()) == manifest
  assert is_prepared(str(dst)) and not is_prepared(str(src))
  assert sorted(p.name for p in (dst / "train").iterdir()) == [
    "index.json",
    "train-00000-of-00002.array_record",
    "train-00001-of-00002.array_record",
  ]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind

  for split in ("train", "test"):
    folder = ImageFolderSource(str(src), split, CLASSES)
    prepared = ArrayRecordImageSource(str(dst), split, CLASSES)
    readable = _readable(folder, skip={corrupt})
    assert len(prepared) == len(readable) == (10 if split == "train" else 6)
    assert prepared.keys == [folder.keys[i] for i in readable]
    np.testing.assert_array_equal(prepared.labels, folder.labels[readable])
    for index, folder_index in enumerate(readable):
      image, label = prepared[index]
      expected_image, expected_label = folder[folder_index]
      assert label == expected_label and image.dtype == np.uint8
      np.testing.assert_array_equal(image, expected_image)

  # Grain workers get the source pickled.
  prepared = ArrayRecordImageSource(str(dst), "test", CLASSES)
  clone = pickle.loads(pickle.dumps(prepared))
  np.testing.assert_array_equal(clone[5][0], prepared[5][0])


def test_command_line_honours_num_shards_and_refuses_to_overwrite(tmp_path):
  src = _make_folder(tmp_path / "src", {"train": 4, "test": 3}, with_corrupt=True)
  dst = tmp_path / "out"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "flax_detector.prepare",
      f"--data_dir={src}",
      f"--out={dst}",
      "--num_shards=3",
      "--class_names=human-art,ai-generated",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert "corrupt.png" in result.stderr
  manifest = json.loads((dst / "prepared.json").read_text())
  assert manifest["splits"]["test"]["shards"] == [f"test/test-0000{i}-of-00003.array_record" for i in range(3)]
  assert len(list((dst / "train").glob("*.array_record"))) == 3

  before = (dst / "prepared.json").read_text()
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare.prepare(str(src), str(dst), CLASSES, num_shards=1)
  assert (dst / "prepared.json").read_text() == before
  prepare.prepare(str(src), str(dst), CLASSES, num_shards=1, overwrite=True)
  assert sorted(p.name for p in (dst / "test").iterdir()) == ["index.json", "test-00000-of-00001.array_record"]
  with pytest.raises(ValueError, match="holds it"):
    prepare.prepare(str(src), str(tmp_path), CLASSES, overwrite=True)


def test_an_interrupted_run_leaves_nothing_that_looks_prepared(tmp_path, monkeypatch):
  src = _make_folder(tmp_path / "src", {"train": 3, "test": 3})
  dst = tmp_path / "out"

  def fail_on_test(key, label, data):
    if key.startswith("test/"):
      raise KeyboardInterrupt
    return encode_record(key, label, data)

  monkeypatch.setattr(prepare, "encode_record", fail_on_test)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(str(src), str(dst), CLASSES)
  assert not dst.exists() and not is_prepared(str(dst))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_reader_rejects_an_incompatible_prepared_folder(tmp_path):
  src = _make_folder(tmp_path / "src", {"train": 3, "test": 3})
  dst = tmp_path / "out"
  prepare.prepare(str(src), str(dst), CLASSES)
  with pytest.raises(ValueError, match=r"prepared.json.*data.class_names"):
    ArrayRecordImageSource(str(dst), "train", ("ai-generated", "human-art"))
  manifest_path = dst / "prepared.json"
  manifest = json.loads(manifest_path.read_text())
  manifest_path.write_text(json.dumps({**manifest, "version": 99}))
  with pytest.raises(ValueError, match=r"prepared.json: format version 99"):
    ArrayRecordImageSource(str(dst), "train", CLASSES)
  manifest_path.unlink()
  with pytest.raises(FileNotFoundError, match=r"prepared.json: missing"):
    ArrayRecordImageSource(str(dst), "train", CLASSES)


def test_training_batches_are_identical_from_the_folder_and_the_prepared_copy(tmp_path, make_config):
  src = _make_folder(tmp_path / "src", {"train": 14, "test": 5})
  dst = tmp_path / "prepared"
  prepare.prepare(str(src), str(dst), CLASSES, num_shards=3)
  from_folder = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(make_config(data__dir=str(src))))
  from_prepared = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(make_config(data__dir=str(dst))))
  assert isinstance(from_prepared.test, ArrayRecordImageSource)
  assert isinstance(from_folder.test, ImageFolderSource)
  for name in ("train", "validation", "test"):
    assert getattr(from_prepared, name).keys == getattr(from_folder, name).keys
  assert len(from_prepared.validation) > 0

  config = make_config(data__dir=str(dst))
  train_settings = input_pipeline.TrainSettings.from_config(config)
  folder_batches = input_pipeline.train_dataset(from_folder.train, train_settings, 0, 1)
  prepared_batches = input_pipeline.train_dataset(from_prepared.train, train_settings, 0, 1)
  assert len(folder_batches) == len(prepared_batches) > 0
  for step in range(len(folder_batches)):
    expected, actual = folder_batches[step], prepared_batches[step]
    np.testing.assert_array_equal(actual["image"], expected["image"])
    np.testing.assert_array_equal(actual["label"], expected["label"])
  folder_eval = input_pipeline.eval_dataset(from_folder.test, input_pipeline.EvalSettings.from_config(config), 0, 1)
  prepared_eval = input_pipeline.eval_dataset(from_prepared.test, input_pipeline.EvalSettings.from_config(config), 0, 1)
  for step in range(len(folder_eval)):
    np.testing.assert_array_equal(prepared_eval[step]["image"], folder_eval[step]["image"])


def test_grain_workers_read_the_prepared_copy(tmp_path, make_config):
  src = _make_folder(tmp_path / "src", {"train": 10, "test": 3})
  dst = tmp_path / "prepared"
  prepare.prepare(str(src), str(dst), CLASSES, num_shards=2)
  config = make_config(data__dir=str(dst))
  train_split = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config)).train
  dataset = input_pipeline.train_dataset(train_split, input_pipeline.TrainSettings.from_config(config), 0, 1)
  iterator = input_pipeline.make_iterator(dataset, 1, 1)
  try:
    with_worker = [batch["image"] for batch in iterator]
  finally:
    iterator.close()
  assert len(with_worker) == len(dataset)
  for step, images in enumerate(with_worker):
    np.testing.assert_array_equal(images, dataset[step]["image"])


def test_a_remote_destination_is_staged_locally_and_gets_prepared_json_last(tmp_path, monkeypatch):
  """The gs:// code path, with a local folder standing in for the bucket."""
  src = _make_folder(tmp_path / "src", {"train": 3, "test": 3})
  dst = tmp_path / "bucket" / "prepared"
  monkeypatch.setattr(prepare.workdir, "is_url", lambda path: str(path) == str(dst))
  staging = tmp_path / "local_tmp"
  staging.mkdir()
  monkeypatch.setattr(prepare.tempfile, "tempdir", str(staging))
  copied = []
  original_copy = type(prepare.epath.Path(tmp_path)).copy
  monkeypatch.setattr(
    type(prepare.epath.Path(tmp_path)),
    "copy",
    lambda self, target, overwrite=False: copied.append(self.name) or original_copy(self, target, overwrite=overwrite),
  )
  prepare.prepare(str(src), str(dst), CLASSES, num_shards=2)
  assert copied[-1] == "prepared.json" and len(copied) == 7  # 2 x (2 shards + index.json), then prepared.json
  assert list(staging.iterdir()) == []
  prepared = ArrayRecordImageSource(str(dst), "train", CLASSES)
  assert prepared.keys == ImageFolderSource(str(src), "train", CLASSES).keys
