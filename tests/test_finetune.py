"""Fine-tuning: init_from (safetensors or workdir), a new head for another class count, freeze=features."""

import functools
import logging

import jax
import numpy as np
import pytest

from flax_detector import (
  checkpoint,
  config_validation,
  finetune,
  import_weights,
  train,
)
from flax_detector.models import create_model, init_variables
from flax_detector.torchvision_weights import to_flax_variables
from tests import torchvision_layout
from tests.conftest import tiny_config

WIDTH = 1 / 16


def _abstract_state(config):
  model = create_model(config.model, len(config.data.class_names), frozen_features=config.freeze == "features")
  optimizer = train.create_optimizer(config, train.create_learning_rate_fn(config, 10, 100))
  return jax.eval_shape(lambda: train.create_train_state(config, model, optimizer))


def _state_holding(config, model, source: str) -> train.TrainState:
  """A train state with a 2-class file's weights: a stand-in for a fresh one that compiles no initialisation."""
  shapes = jax.eval_shape(lambda: init_variables(model, config.image_size, jax.random.PRNGKey(0)))
  variables = finetune.imported_variables(finetune.from_safetensors(source), shapes, config)
  return train.create_train_state(config, model, train.create_optimizer(config, lambda _: 1e-2), variables)


def _size(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_frozen_features_carry_no_optimizer_state():
  trained, frozen = _abstract_state(tiny_config()), _abstract_state(tiny_config(freeze="features"))
  classifier = _size({name: leaf for name, leaf in frozen.params.items() if name.startswith("Dense_")})
  assert classifier < _size(frozen.params)
  # Adam's two moments per trained parameter, plus step counters.
  assert 2 * _size(trained.params) <= _size(trained.opt_state) < 2 * _size(trained.params) + 8
  assert 2 * classifier <= _size(frozen.opt_state) < 2 * classifier + 8


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"freeze": "conv"}, "freeze='conv': use one of ('none', 'features')"),
    ({"init_from": "/no/such/weights.safetensors"}, "no such file or folder"),
  ],
)
def test_fine_tuning_settings_are_checked_before_any_data_is_read(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_validation.validate(tiny_config(**overrides))


def test_init_from_a_pickle_or_a_plain_folder_says_what_to_give(tmp_path):
  (tmp_path / "vgg16.pth").write_bytes(b"")
  with pytest.raises(ValueError, match="a PyTorch pickle; convert it first: python -c"):
    config_validation.validate(tiny_config(init_from=str(tmp_path / "vgg16.pth")))
  with pytest.raises(ValueError, match="a folder without config.json and checkpoints/"):
    config_validation.validate(tiny_config(init_from=str(tmp_path)))


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  """A VGG16-BN state dict with a 5-class head (standing in for ImageNet's 1000), saved as safetensors."""
  state = torchvision_layout.random_state_dict(True, WIDTH, 5, seed=4)
  return state, torchvision_layout.save(state, tmp_path_factory.mktemp("weights") / "vgg16_bn.safetensors")


def test_fine_tuning_with_frozen_features_trains_only_a_new_head(imagenet_like, tmp_path, caplog):
  state_dict, source = imagenet_like
  config = tiny_config(init_from=source, freeze="features")
  model = create_model(config.model, 2, frozen_features=True)
  fresh = _state_holding(
    config,
    model,
    torchvision_layout.save(
      torchvision_layout.random_state_dict(True, WIDTH, 2, seed=7), tmp_path / "fresh.safetensors"
    ),
  )
  with caplog.at_level(logging.INFO):
    state = finetune.start_from_init_from(fresh, config)
  assert "its last layer (Dense_2) has 5 classes, this model 2: that layer is re-initialised" in caplog.text
  assert np.array_equal(np.asarray(state.params["Dense_2"]["kernel"]), np.asarray(fresh.params["Dense_2"]["kernel"]))
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
    "label": rng.integers(0, 2, 8).astype(np.int32),
    "mask": np.ones(8, bool),
  }
  step = jax.jit(functools.partial(train.train_step, class_weights=np.ones(2, np.float32)))
  for _ in range(2):
    state, _ = step(state, batch)
  trained = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  loaded = to_flax_variables(state_dict, source)
  for collection in ("params", "batch_stats"):
    for module, leaves in loaded[collection].items():
      if not module.startswith("Dense_"):  # convolutions and BatchNorm, statistics included, exactly as loaded
        for name, value in leaves.items():
          assert np.array_equal(trained[collection][module][name], value), (collection, module, name)
  assert not np.array_equal(trained["params"]["Dense_0"]["kernel"], loaded["params"]["Dense_0"]["kernel"])


def test_training_resumes_from_an_imported_workdir_at_step_zero(imagenet_like, tmp_path):
  config = tiny_config()
  two_classes = torchvision_layout.random_state_dict(True, WIDTH, 2, seed=5)
  source = torchvision_layout.save(two_classes, tmp_path / "two.safetensors")
  import_weights.import_weights(source, str(tmp_path / "imported"), config)
  abstract = _abstract_state(config)
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  with checkpoint.Checkpointer(tmp_path / "imported" / "checkpoints", 1, 1, checkpoint.Topology(1, 0)) as saved:
    state, data_position = saved.restore_latest(
      checkpoint.abstract_with_shardings(abstract, shardings), lambda start_step: start_step
    )
  assert int(state.step) == 0 and data_position == 0
  expected = to_flax_variables(two_classes, source)
  assert np.array_equal(np.asarray(state.params["Dense_0"]["kernel"]), expected["params"]["Dense_0"]["kernel"])
  assert np.array_equal(
    np.asarray(state.batch_stats["BatchNorm_7"]["var"]), expected["batch_stats"]["BatchNorm_7"]["var"]
  )
  assert all(not np.any(np.asarray(moment)) for moment in jax.tree.leaves(state.opt_state))  # a fresh optimizer


def test_init_from_a_workdir_loads_every_layer_of_the_same_class_count(tmp_path):
  config = tiny_config()
  two_classes = torchvision_layout.random_state_dict(True, WIDTH, 2, seed=6)
  import_weights.import_weights(
    torchvision_layout.save(two_classes, tmp_path / "w.safetensors"), str(tmp_path / "imported"), config
  )
  config.init_from = str(tmp_path / "imported")
  model = create_model(config.model, 2)
  fresh = _state_holding(
    config,
    model,
    torchvision_layout.save(
      torchvision_layout.random_state_dict(True, WIDTH, 2, seed=8), tmp_path / "fresh.safetensors"
    ),
  )
  started = finetune.start_from_init_from(fresh, config)
  expected = to_flax_variables(two_classes, "")
  assert np.array_equal(np.asarray(started.params["Dense_2"]["kernel"]), expected["params"]["Dense_2"]["kernel"])
  assert np.array_equal(np.asarray(started.params["Conv_3"]["kernel"]), expected["params"]["Conv_3"]["kernel"])
  config.model.width_multiplier = 1 / 8
  wider = jax.eval_shape(
    lambda: init_variables(create_model(config.model, 2), config.image_size, jax.random.PRNGKey(0))
  )
  with pytest.raises(finetune.WeightsFileError, match=r"params/BatchNorm_0/bias has shape \(4,\), the model needs"):
    finetune.fitted_leaves(finetune.load_pretrained(config.init_from), wider, config, new_head_allowed=True)
