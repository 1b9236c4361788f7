"""Checks a training config once, at start-up, so a bad setting fails before any work is done."""

from etils import epath
import jax.numpy as jnp
import ml_collections

from flax_detector import workdir
from flax_detector.data.folder import BAD_FILE_POLICIES
from flax_detector.preprocess import CROP_POLICIES, PREPROCESS_MODES
from flax_detector.sharding import SHARDING_STRATEGIES

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
    return (f"init_from={path}: a folder without {workdir.CONFIG} and {workdir.CHECKPOINTS}/; give a "
            f"flax_detector workdir or a .safetensors file")
  if not location.exists():
    return f"init_from={path}: no such file or folder; give a .safetensors state dict or a flax_detector workdir"
  if location.suffix in _PICKLE_SUFFIXES:
    return (f"init_from={path}: a PyTorch pickle; convert it first: python -c \"import torch, safetensors.torch as "
            f"st; st.save_file(torch.load('{path}', map_location='cpu'), 'weights.safetensors')\"")
  return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field that cannot work; normalizes data.class_names in place."""
  config.data.class_names = normalize_class_names(config.data.class_names)
  names = config.data.class_names
  checks = [
      (len(names) >= 2 and len(set(names)) == len(names) and all(names),
       f"data.class_names={names}: need at least 2 distinct, non-empty names"),
      (config.data.positive_class in names,
       f"data.positive_class={config.data.positive_class!r} is not one of data.class_names={names}"),
      (config.data.preprocess in PREPROCESS_MODES, f"data.preprocess={config.data.preprocess!r}: use one of {PREPROCESS_MODES}"),
      (config.data.crop_policy in CROP_POLICIES, f"data.crop_policy={config.data.crop_policy!r}: use one of {CROP_POLICIES}"),
      (0.0 <= config.data.shared_crop_quantile < 1.0,
       f"data.shared_crop_quantile={config.data.shared_crop_quantile}: must be in [0, 1)"),
      (config.data.on_bad_file in BAD_FILE_POLICIES,
       f"data.on_bad_file={config.data.on_bad_file!r}: use one of {BAD_FILE_POLICIES}"),
      (config.data.max_image_pixels > 0, f"data.max_image_pixels={config.data.max_image_pixels}: must be positive"),
      *[(0.0 <= config.data[name] <= 1.0, f"data.{name}={config.data[name]}: must be a probability in [0, 1]")
        for name in ("flip_probability", "jpeg_probability", "blur_probability")],
      (1 <= config.data.jpeg_quality_min <= config.data.jpeg_quality_max <= 100,
       f"data.jpeg_quality_min/max={config.data.jpeg_quality_min}/{config.data.jpeg_quality_max}: "
       "need 1 <= min <= max <= 100"),
      (0.0 < config.data.blur_sigma_min <= config.data.blur_sigma_max,
       f"data.blur_sigma_min/max={config.data.blur_sigma_min}/{config.data.blur_sigma_max}: need 0 < min <= max"),
      *[(config.data[name] >= 1, f"data.{name}={config.data[name]}: must be >= 1")
        for name in ("eval_grid", "periodic_eval_grid")],
      (config.data.worker_count >= 0, f"data.worker_count={config.data.worker_count}: must be >= 0"),
      (config.image_size >= MIN_IMAGE_SIZE, f"image_size={config.image_size}: VGG16 needs at least {MIN_IMAGE_SIZE}"),
      (config.batch_size > 0 and config.eval_batch_size > 0,
       f"batch_size={config.batch_size}, eval_batch_size={config.eval_batch_size}: must be positive"),
      (config.num_epochs >= 1, f"num_epochs={config.num_epochs}: must be >= 1"),
      (config.min_train_steps >= 0, f"min_train_steps={config.min_train_steps}: must be >= 0"),
      (config.learning_rate > 0, f"learning_rate={config.learning_rate}: must be positive"),
      (config.warmup_epochs >= 0, f"warmup_epochs={config.warmup_epochs}: must be >= 0"),
      (config.log_every_steps >= 1, f"log_every_steps={config.log_every_steps}: must be >= 1"),
      (config.max_checkpoints_to_keep >= 1, f"max_checkpoints_to_keep={config.max_checkpoints_to_keep}: must be >= 1"),
      (config.sharding in SHARDING_STRATEGIES, f"sharding={config.sharding!r}: use one of {SHARDING_STRATEGIES}"),
      (config.model.width_multiplier > 0, f"model.width_multiplier={config.model.width_multiplier}: must be positive"),
      (0.0 <= config.model.dropout_rate < 1.0, f"model.dropout_rate={config.model.dropout_rate}: must be in [0, 1)"),
      (config.freeze in FREEZE_OPTIONS, f"freeze={config.freeze!r}: use one of {FREEZE_OPTIONS}"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  init_from = _init_from_problem(config.init_from)
  if init_from:
    raise ValueError(init_from)
  try:
    dtype = jnp.dtype(config.model.dtype)
  except TypeError as error:
    raise ValueError(f"model.dtype={config.model.dtype!r}: use float32, bfloat16 or float16") from error
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"model.dtype={config.model.dtype!r}: use float32, bfloat16 or float16")
