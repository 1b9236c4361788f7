import os

import numpy as np
import pytest
from PIL import Image

from flax_detector import input_pipeline
from flax_detector.data import decoded_cache, folder, host_resources
from flax_detector.data.decode import UnreadableImageError
from flax_detector.data.synthetic import SyntheticSource


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
  """The cache's memory folder, here the test's own, so that what it leaves behind can be seen."""
  shm = tmp_path / "shm"
  shm.mkdir()
  monkeypatch.setattr(decoded_cache, "_SHM", str(shm))
  return shm


def _datasets(config):
  splits = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config))
  train = input_pipeline.train_dataset(splits.train, input_pipeline.TrainSettings.from_config(config), 0, 1)
  validation = input_pipeline.eval_dataset(splits.validation, input_pipeline.EvalSettings.from_config(config), 0, 1)
  return train, validation


def _all_batches(config) -> list[dict[str, np.ndarray]]:
  """Every training batch of the run, then every validation batch."""
  return [dataset[i] for dataset in _datasets(config) for i in range(len(dataset))]


def _assert_bitwise_equal(batches, others):
  assert len(batches) == len(others)
  for batch, other in zip(batches, others):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(batch[key], other[key])


def test_cached_batches_are_bitwise_the_uncached_ones_and_each_image_is_decoded_once(
  make_config, cache_folder, monkeypatch
):
  settings = {"data__jpeg_probability": 0.5, "data__blur_probability": 0.5, "data__val_fraction": 0.2}
  uncached = _all_batches(make_config(**settings))
  decoded = []
  original = SyntheticSource.image
  monkeypatch.setattr(SyntheticSource, "image", lambda self, *args: decoded.append(args) or original(self, *args))
  cached = _all_batches(make_config(**settings, data__cache_decoded=True))
  _assert_bitwise_equal(uncached, cached)
  assert len(decoded) == 160  # the 160 train/ records (training and validation share), once each
  assert not os.listdir(cache_folder)  # the file is unlinked as soon as it is created


def _jpeg_folder(root, count: int) -> None:
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for label, name in enumerate(("human-art", "ai-generated")):
      (root / split / name).mkdir(parents=True)
      for index in range(count):
        pixels = rng.integers(0, 256, (150, 130 + 20 * label, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{index}.jpg", quality=90)


def test_resize_mode_and_a_file_broken_after_indexing_give_the_same_batches(make_config, tmp_path, caplog, monkeypatch):
  data = tmp_path / "data"
  _jpeg_folder(data, 8)
  settings = {"data__dir": str(data), "data__preprocess": "resize", "data__val_fraction": 0.25, "batch_size": 8}
  read_image = folder.read_image

  def broken_later(path, shorter_side=None):
    if path.endswith("2.jpg"):  # passed the folder's probe, unreadable ever since
      raise UnreadableImageError(f"{path}: cannot be read (gone)")
    return read_image(path, shorter_side)

  monkeypatch.setattr(folder, "read_image", broken_later)
  uncached = _all_batches(make_config(**settings))
  caplog.clear()
  cached = _all_batches(make_config(**settings, data__cache_decoded=True))
  _assert_bitwise_equal(uncached, cached)
  masks = np.concatenate([batch["mask"] for batch in cached])
  assert 0 < (~masks).sum() < masks.size and "2.jpg: cannot be read" in caplog.text
  assert cached[0]["image"].shape[1:] == (32, 32, 3)


def test_grain_workers_read_the_training_process_file(make_config):
  train, _ = _datasets(make_config(data__cache_decoded=True))
  in_process = [batch["image"] for batch in input_pipeline.make_iterator(train, 0, 1, start=5)]
  iterator = input_pipeline.make_iterator(train, 1, 1, start=5)
  try:
    from_worker = [batch["image"] for batch in iterator]
  finally:
    iterator.close()
  for a, b in zip(in_process, from_worker, strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_cache_that_does_not_fit_is_refused_with_the_sizes(make_config, cache_folder, monkeypatch):
  monkeypatch.setattr(host_resources, "available_memory_bytes", lambda: 100_000)
  with pytest.raises(ValueError, match=r"data.cache_decoded=True: the decoded training images need [0-9,]+ MiB, but"):
    _datasets(make_config(data__cache_decoded=True))
  assert not os.listdir(cache_folder)


def test_auto_caches_a_split_that_fits_easily_and_leaves_one_that_does_not(make_config, monkeypatch, caplog):
  caplog.set_level("INFO")
  settings = {"data__jpeg_probability": 0.5, "data__val_fraction": 0.2}
  uncached = _all_batches(make_config(**settings))
  cached = _all_batches(make_config(**settings, data__cache_decoded="auto"))
  assert "data.cache_decoded='auto': caching" in caplog.text
  _assert_bitwise_equal(uncached, cached)

  caplog.clear()
  monkeypatch.setattr(host_resources, "available_memory_bytes", lambda: 100_000)
  _datasets(make_config(data__cache_decoded="auto"))  # where True would refuse to start, "auto" goes on
  assert "data.cache_decoded='auto': not caching, since the decoded images need" in caplog.text
  assert "decoded once into" not in caplog.text


def test_cache_decoded_accepts_only_true_false_or_auto(make_config):
  from flax_detector import config_validation  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="data.cache_decoded='yes': use True, False or 'auto'"):
    config_validation.validate(make_config(data__cache_decoded="yes"))
