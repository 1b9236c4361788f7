"""Checks a training config once, at start-up, so a bad setting fails before any work is done."""

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from flax_detector import compute_library, sharding, workdir
from flax_detector.data import host_resources
from flax_detector.data.folder import BAD_FILE_POLICIES
from flax_detector.preprocess import CROP_POLICIES, PREPROCESS_MODES

# Five 2x2 max pools: a smaller crop would pool below one pixel.
MIN_IMAGE_SIZE = 32
# config.freeze: "features" trains only the classifier (see finetune).
FREEZE_OPTIONS = ("none", "features")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def normalize_class_names(value) -> tuple[str, ...]:
  """Accepts ("a", "b") or the command-line form "a,b" (which arrives as the 1-tuple ("a,b",))."""
  names = [value] if isinstance(value, str) else list(value)
  if len(names) == 1 and "," in names[0]:
    names = names[0].split(",")
  return tuple(name.strip() for name in names)


def _init_from_problem(path: str) -> str | None:
  """Why config.init_from cannot be used, or None (the weights themselves are read when training starts)."""
  if not path:
    return None
  location = epath.Path(path)
  if location.is_dir():
    if (location / workdir.CONFIG).exists() and (location / workdir.CHECKPOINTS).exists():
      return None
    return (
      f"init_from={path}: a folder without {workdir.CONFIG} and {workdir.CHECKPOINTS}/; give a "
      f"flax_detector workdir or a .safetensors file"
    )
  if not location.exists():
    return f"init_from={path}: no such file or folder; give a .safetensors state dict or a flax_detector workdir"
  if location.suffix in _PICKLE_SUFFIXES:
    return (
      f'init_from={path}: a PyTorch pickle; convert it first: python -c "import torch, safetensors.torch as '
      f"st; st.save_file(torch.load('{path}', map_location='cpu'), 'weights.safetensors')\""
    )
  return None


def parse_class_weights(setting: str | Sequence[float], num_classes: int) -> str | tuple[float, ...]:
  """config.class_weights as "balanced", "none" or `num_classes` explicit weights (from "w0,w1" or a sequence)."""
  if isinstance(setting, str) and setting.strip().lower() in ("balanced", "none"):
    return setting.strip().lower()
  try:
    values = tuple(float(v) for v in (setting.split(",") if isinstance(setting, str) else setting))
  except ValueError as error:
    raise ValueError(
      f"class_weights={setting!r}: use 'balanced', 'none' or {num_classes} numbers like '1.0,2.0'"
    ) from error
  if len(values) != num_classes or any(not np.isfinite(v) or v < 0 for v in values) or sum(values) == 0:
    raise ValueError(f"class_weights={setting!r}: need {num_classes} finite non-negative weights, not all zero")
  return values


def _source_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  """Where the images come from and how they are loaded."""
  data = config.data
  return [
    (0.0 <= data.val_fraction < 1.0, f"data.val_fraction={data.val_fraction}: must be in [0, 1)"),
    (
      data.cache_decoded is True or data.cache_decoded is False or data.cache_decoded == "auto",
      f"data.cache_decoded={data.cache_decoded!r}: use True, False or 'auto'",
    ),
    (
      bool(data.dir) or len(data.class_names) == 2,
      f"data.class_names={data.class_names}: the synthetic set (data.dir='') has exactly 2 classes",
    ),
    (
      bool(data.dir) or MIN_IMAGE_SIZE <= data.synthetic_min_side <= data.synthetic_max_side,
      f"data.synthetic_min_side={data.synthetic_min_side}, data.synthetic_max_side={data.synthetic_max_side}: "
      f"need {MIN_IMAGE_SIZE} <= min <= max",
    ),
    (data.worker_buffer_size >= 1, f"data.worker_buffer_size={data.worker_buffer_size}: must be >= 1"),
  ]


def _check_dtype(name: str) -> None:
  """model.dtype must name a floating-point dtype that jnp knows."""
  try:
    dtype = jnp.dtype(name)
  except TypeError as error:
    raise ValueError(f"model.dtype={name!r}: use float32, bfloat16 or float16") from error
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"model.dtype={name!r}: use float32, bfloat16 or float16")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with data.class_names split (normalize_class_names), data.worker_count=-1
  resolved to a count for this host (host_resources.auto_worker_count), and every field checked.

  Raises ValueError naming the first field that cannot work; `config` itself is left as it is. The
  batch sizes are checked against the mesh of every device (sharding.create_mesh): call it after
  jax.distributed is initialised, as training does.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.class_names = normalize_class_names(config.data.class_names)
  names = config.data.class_names
  checks = [
    (
      len(names) >= 2 and len(set(names)) == len(names) and all(names),
      f"data.class_names={names}: need at least 2 distinct, non-empty names",
    ),
    (
      config.data.positive_class in names,
      f"data.positive_class={config.data.positive_class!r} is not one of data.class_names={names}",
    ),
    (
      config.data.preprocess in PREPROCESS_MODES,
      f"data.preprocess={config.data.preprocess!r}: use one of {PREPROCESS_MODES}",
    ),
    (
      config.data.crop_policy in CROP_POLICIES,
      f"data.crop_policy={config.data.crop_policy!r}: use one of {CROP_POLICIES}",
    ),
    (
      0.0 <= config.data.shared_crop_quantile < 1.0,
      f"data.shared_crop_quantile={config.data.shared_crop_quantile}: must be in [0, 1)",
    ),
    (
      config.data.on_bad_file in BAD_FILE_POLICIES,
      f"data.on_bad_file={config.data.on_bad_file!r}: use one of {BAD_FILE_POLICIES}",
    ),
    (config.data.max_image_pixels > 0, f"data.max_image_pixels={config.data.max_image_pixels}: must be positive"),
    *[
      (0.0 <= config.data[name] <= 1.0, f"data.{name}={config.data[name]}: must be a probability in [0, 1]")
      for name in ("flip_probability", "jpeg_probability", "blur_probability")
    ],
    (
      1 <= config.data.jpeg_quality_min <= config.data.jpeg_quality_max <= 100,
      f"data.jpeg_quality_min/max={config.data.jpeg_quality_min}/{config.data.jpeg_quality_max}: "
      "need 1 <= min <= max <= 100",
    ),
    (
      0.0 < config.data.blur_sigma_min <= config.data.blur_sigma_max,
      f"data.blur_sigma_min/max={config.data.blur_sigma_min}/{config.data.blur_sigma_max}: need 0 < min <= max",
    ),
    *[
      (config.data[name] >= 1, f"data.{name}={config.data[name]}: must be >= 1")
      for name in ("eval_grid", "periodic_eval_grid")
    ],
    (
      config.data.worker_count >= -1,
      f"data.worker_count={config.data.worker_count}: use -1 (chosen from the host's cores) or >= 0",
    ),
    (config.image_size >= MIN_IMAGE_SIZE, f"image_size={config.image_size}: VGG16 needs at least {MIN_IMAGE_SIZE}"),
    (
      config.batch_size > 0 and config.eval_batch_size > 0,
      f"batch_size={config.batch_size}, eval_batch_size={config.eval_batch_size}: must be positive",
    ),
    (config.num_epochs >= 1, f"num_epochs={config.num_epochs}: must be >= 1"),
    (config.min_train_steps >= 0, f"min_train_steps={config.min_train_steps}: must be >= 0"),
    (config.learning_rate > 0, f"learning_rate={config.learning_rate}: must be positive"),
    (config.warmup_epochs >= 0, f"warmup_epochs={config.warmup_epochs}: must be >= 0"),
    (config.log_every_steps >= 1, f"log_every_steps={config.log_every_steps}: must be >= 1"),
    (config.max_checkpoints_to_keep >= 1, f"max_checkpoints_to_keep={config.max_checkpoints_to_keep}: must be >= 1"),
    (
      config.sharding in sharding.SHARDING_STRATEGIES,
      f"sharding={config.sharding!r}: use one of {sharding.SHARDING_STRATEGIES}",
    ),
    (config.model.width_multiplier > 0, f"model.width_multiplier={config.model.width_multiplier}: must be positive"),
    (0.0 <= config.model.dropout_rate < 1.0, f"model.dropout_rate={config.model.dropout_rate}: must be in [0, 1)"),
    (config.freeze in FREEZE_OPTIONS, f"freeze={config.freeze!r}: use one of {FREEZE_OPTIONS}"),
  ]
  for ok, message in checks + _source_checks(config):
    if not ok:
      raise ValueError(message)
  parse_class_weights(config.class_weights, len(names))
  mesh = sharding.create_mesh()
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_divisible(config[name], name, mesh)
  init_from = _init_from_problem(config.init_from)
  if init_from:
    raise ValueError(init_from)
  _check_dtype(config.model.dtype)
  compute_library.uses_onednn(config.model.get("library", "auto"))  # a bad choice or an impossible "onednn"
  if config.data.worker_count == -1:
    config.data.worker_count = host_resources.auto_worker_count()
    logging.info(
      "data.worker_count=-1: %d Grain workers for %d usable cores",
      config.data.worker_count,
      host_resources.usable_cores(),
    )
  return config
