import pytest

from configs.vgg16 import get_config
from flax_detector import config_validation


def test_presets_are_valid_and_differ():
  default, cpu = get_config(), get_config("cpu")
  config_validation.validate(default)
  config_validation.validate(cpu)
  assert default.image_size == 224 and default.model.width_multiplier == 1.0
  assert cpu.image_size < default.image_size and cpu.model.width_multiplier < 1.0
  assert default.data.class_names == ("human-art", "ai-generated")


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="gpu"):
    get_config("gpu")


def test_command_line_class_names_are_split_in_a_copy():
  config = get_config("cpu")
  config.data.class_names = ("real,fake",)
  config.data.positive_class = "fake"
  assert config_validation.validate(config).data.class_names == ("real", "fake")
  assert config.data.class_names == ("real,fake",)  # the caller's config is left as it was


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("image_size", 16, "image_size=16"),
    ("log_every_steps", 0, "log_every_steps=0"),
    ("sharding", "tp", "sharding='tp'"),
    ("data.positive_class", "robot-art", "data.positive_class"),
    ("data.preprocess", "warp", "data.preprocess"),
    ("data.preprocess", "stretch", "data.preprocess"),
    ("sharding", "zero", "sharding='zero'"),
    ("batch_size", 15, "batch_size=15"),  # the tests' mesh has 8 devices
    ("eval_batch_size", 12, "eval_batch_size=12"),
    ("data.val_fraction", 1.0, "data.val_fraction"),
    ("data.synthetic_min_side", 16, "data.synthetic_min_side"),
    ("data.class_names", ("human-art", "ai-generated", "photo"), "synthetic set"),
    ("data.periodic_eval_grid", 0, "data.periodic_eval_grid"),
    ("data.worker_buffer_size", 0, "data.worker_buffer_size"),
    ("model.dtype", "int8", "model.dtype"),
    ("model.dtype", "float33", "model.dtype"),
  ],
)
def test_bad_fields_are_named(field, value, message):
  config = get_config("cpu")
  parent, _, leaf = field.rpartition(".")
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)


@pytest.mark.parametrize("field, value", [("jpeg_probability", 1.5), ("jpeg_quality_min", 0), ("blur_sigma_min", 0.0)])
def test_invalid_augment_settings_are_named_before_any_file_is_read(make_config, field, value):
  config = make_config(**{f"data__{field}": value}, data__dir="/nonexistent/folder")
  with pytest.raises(ValueError, match=f"data.{field}"):
    config_validation.validate(config)  # the folder is never looked at: the setting fails first


@pytest.mark.parametrize("setting", ["1,2,3", "heavy", "-1,1", "0,0"])
def test_bad_class_weights_are_rejected(setting):
  config = get_config("cpu")
  config.class_weights = setting
  with pytest.raises(ValueError, match="class_weights"):
    config_validation.validate(config)


def test_class_weights_parse_to_balanced_none_or_numbers():
  assert config_validation.parse_class_weights(" Balanced ", 2) == "balanced"
  assert config_validation.parse_class_weights("none", 2) == "none"
  assert config_validation.parse_class_weights("1,3.5", 2) == (1.0, 3.5)
  assert config_validation.parse_class_weights((2, 1), 2) == (2.0, 1.0)
