import subprocess
import sys

import numpy as np
import pytest

from flax_detector import input_pipeline
from flax_detector.data.sources import split_off_validation
from flax_detector.data.synthetic import SyntheticSource


def _splits(config):
  return input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config))


def _train_settings(config):
  return input_pipeline.TrainSettings.from_config(config)


def _batches(config, process_index=0, process_count=1, split="train"):
  splits = _splits(config)
  if split == "train":
    dataset = input_pipeline.train_dataset(splits.train, _train_settings(config), process_index, process_count)
  else:
    settings = input_pipeline.EvalSettings.from_config(config)
    dataset = input_pipeline.eval_dataset(getattr(splits, split), settings, process_index, process_count)
  return [dataset[i] for i in range(len(dataset))]


def test_same_seed_same_batches_other_seed_other_batches(make_config):
  first, again = _batches(make_config()), _batches(make_config())
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = _batches(make_config(seed=1))
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_every_epoch_sees_every_record_once_in_a_new_order(make_config):
  config = make_config(batch_size=8)
  splits = _splits(config)
  dataset = input_pipeline.train_dataset(splits.train, _train_settings(config), 0, 1)
  # The position stream behind the batches: (record, epoch) pairs.
  positions = dataset._parent  # pylint: disable=protected-access
  records = np.concatenate([positions[i][0] for i in range(len(positions))])
  epochs = np.concatenate([positions[i][1] for i in range(len(positions))])
  n = len(splits.train)
  first, second = records[epochs == 0], records[epochs == 1]
  assert sorted(first.tolist()) == list(range(n))
  assert len(second) and not np.array_equal(first[: len(second)], second)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_process_count(make_config, process_count):
  config = make_config()
  single = _batches(config)
  shares = [_batches(config, index, process_count) for index in range(process_count)]
  assert all(len(share) == len(single) for share in shares)
  for step, whole in enumerate(single):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([share[step][key] for share in shares]), whole[key])


def test_eval_pads_and_masks_so_every_example_counts_once(make_config):
  config = make_config()  # 40 test images, global eval batch 24: 2 steps, 8 padded slots
  shares = [_batches(config, index, 2, split="test") for index in range(2)]
  assert len(shares[0]) == len(shares[1]) == 2
  assert shares[0][0]["image"].shape == (12, 4, 32, 32, 3)  # 2x2 eval views per image
  masks = np.concatenate([batch["mask"] for share in shares for batch in share])
  assert masks.sum() == 40 and masks.size == 48
  labels = np.concatenate([batch["label"][batch["mask"]] for share in shares for batch in share])
  assert np.bincount(labels).tolist() == [20, 20]


def test_augmentation_depends_on_seed_record_and_epoch_only(make_config):
  config = make_config(data__jpeg_probability=0.5, data__blur_probability=0.5)
  a, b = _batches(config), _batches(config)
  np.testing.assert_array_equal(np.stack([x["image"] for x in a]), np.stack([x["image"] for x in b]))


def test_workers_give_the_same_batches_as_in_process(make_config):
  config = make_config()
  splits = _splits(config)
  dataset = input_pipeline.train_dataset(splits.train, _train_settings(config), 0, 1)
  in_process = [batch["image"] for batch in input_pipeline.make_iterator(dataset, 0, 1, start=3)]
  iterator = input_pipeline.make_iterator(dataset, 2, 1, start=3)
  try:
    with_workers = [batch["image"] for batch in iterator]
  finally:
    iterator.close()
  assert len(in_process) == len(dataset) - 3
  for a, b in zip(in_process, with_workers, strict=True):
    np.testing.assert_array_equal(a, b)


def test_validation_split_is_stable_and_disjoint():
  source = SyntheticSource("train", 400, 32, 48)
  train, validation = split_off_validation(source, 0.25)
  assert set(train.keys).isdisjoint(validation.keys) and len(train) + len(validation) == 400
  assert 60 <= len(validation) <= 140
  smaller = SyntheticSource("train", 300, 32, 48)
  _, smaller_validation = split_off_validation(smaller, 0.25)
  # A record stays in its split when others are added or removed.
  assert set(smaller_validation.keys) == {key for key in validation.keys if int(key.rsplit("/", 1)[1]) < 300}


def test_a_batch_larger_than_the_whole_schedule_is_named(make_config):
  config = make_config(batch_size=10_000)
  with pytest.raises(ValueError, match="batch_size=10000"):
    _batches(config)


def test_unreadable_files_are_left_out_and_a_file_broken_later_is_masked(make_config, tmp_path, caplog):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for split in ("train", "test"):
    for label, name in enumerate(("human-art", "ai-generated")):
      folder = tmp_path / split / name
      folder.mkdir(parents=True)
      for index in range(8):
        Image.new("RGB", (40, 36), (label * 200, index * 20, 0)).save(folder / f"{index}.png")
  (tmp_path / "train/human-art/broken.png").write_bytes(b"not a png")
  (tmp_path / "test/ai-generated/broken.png").write_bytes(b"not a png")
  config = make_config(data__dir=str(tmp_path), data__val_fraction=0.0, batch_size=8, num_epochs=1)
  splits = _splits(config)
  assert "train/human-art/broken.png" not in splits.train.keys and len(splits.train) == 16
  assert len(splits.test) == 16 and len(splits.skipped) == 2
  np.testing.assert_array_equal(np.bincount(splits.train.labels), [8, 8])  # counts and weights exclude it

  # A file that breaks after the index was built costs one masked example, not the run.
  later = splits.train.keys.index("train/human-art/3.png")
  (tmp_path / "train/human-art/3.png").write_bytes(b"truncated")
  train = input_pipeline.train_dataset(splits.train, _train_settings(config), 0, 1)
  batches = [train[i] for i in range(len(train))]
  masked = np.concatenate([batch["mask"] for batch in batches])
  assert masked.sum() == masked.size - 1  # the one broken record, wherever the shuffle put it
  test = input_pipeline.eval_dataset(splits.test, input_pipeline.EvalSettings.from_config(config), 0, 1)
  test_masks = np.concatenate([test[i]["mask"] for i in range(len(test))])
  assert test_masks.sum() == 16
  assert "3.png" in caplog.text and splits.train.labels[later] == 0


# Grain's worker processes are spawned: each re-imports the command's module (multiprocessing runs it as
# __mp_main__) before it decodes anything. TensorFlow, which CLU's metric writers import, costs a worker
# about 10 s of CPU there; with `benchmark` importing it, three workers spent ~30 s of a 2-core machine's
# CPU during a 40-50 s end-to-end measurement.
_IMPORTS_TENSORFLOW = """
import importlib, sys
importlib.import_module(sys.argv[1])
print("tensorflow" in sys.modules)
"""


@pytest.mark.parametrize(
  "command", ["flax_detector.main", "flax_detector.benchmark", "flax_detector.predict", "flax_detector.evaluate"]
)
def test_commands_that_start_grain_workers_do_not_import_tensorflow_at_module_level(command):
  result = subprocess.run(
    [sys.executable, "-c", _IMPORTS_TENSORFLOW, command], capture_output=True, text=True, timeout=120, check=True
  )
  assert result.stdout.strip().splitlines()[-1] == "False"
