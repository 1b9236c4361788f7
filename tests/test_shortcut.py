"""On a folder where image size separates the classes, the cpu preset must learn the generator trace.

The public anime data has small human images and 512-px AI images: with image_size crops every human
image is zero-padded and no AI image is, and "black border -> human" scores ~100% on such a test split
while learning nothing about generators. train/ here recreates that confound (human 40-60 px, below the
preset's 64-px image_size; AI 160-256 px), test/ holds both classes at the same sizes (48-128 px), from
the same drawings and upsamplers. Only a model that learnt the trace scores well on test/.
"""

import json
import pathlib

import pytest
import shortcut_data

from configs.vgg16 import get_config


@pytest.fixture(scope="module")
def confounded_dir(tmp_path_factory) -> pathlib.Path:
  # ~1,000 training images: the trace is learnt in ~150 steps; fewer images overfit the drawings first.
  return shortcut_data.write_size_confounded_folder(tmp_path_factory.mktemp("confounded"), 384, 64)


def _train_cpu_preset(data_dir: pathlib.Path, workdir: pathlib.Path, crop_policy: str) -> dict:
  """The cpu preset as shipped, shrunk only in time: fewer epochs, decoding in-process, no mid-run evals."""
  from flax_detector import train  # pylint: disable=g-import-not-at-top

  config = get_config("cpu")
  config.data.dir = str(data_dir)
  config.data.crop_policy = crop_policy
  config.num_epochs = 8
  config.min_train_steps = 0  # 8 epochs of these 690 images (173 steps) suffice once only size is confounded
  config.data.worker_count = 0
  config.eval_every_steps = 10**6  # validation only at the last step
  config.checkpoint_every_steps = 10**6  # one checkpoint, at the end
  train.train_and_evaluate(config, str(workdir))
  return json.loads((workdir / "final_metrics.json").read_text())


def test_default_policy_learns_the_trace_not_the_size(confounded_dir, tmp_path):
  final = _train_cpu_preset(confounded_dir, tmp_path, get_config("cpu").data.crop_policy)
  assert final["split"] == "test" and final["num_examples"] == 128
  assert final["eval_accuracy"] >= 0.90, final


def test_padding_policy_learns_the_size(confounded_dir, tmp_path):
  """The control: with every human image zero-padded, the border is the easy cue and test/ drops toward chance.

  Without it, a pass of the test above could mean the folder never offered a size shortcut at all.
  """
  final = _train_cpu_preset(confounded_dir, tmp_path, "pad")
  assert final["eval_accuracy"] <= 0.75, final
