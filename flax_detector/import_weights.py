"""Imports torchvision VGG16 weights into a workdir: `python -m flax_detector.import_weights --source=FILE.safetensors
--workdir=OUT [--config=configs/vgg16.py[:preset]] [--config.x=...]`.

FILE is a torchvision `vgg16` or `vgg16_bn` state dict saved with safetensors (no PyTorch needed here);
BatchNorm or not is read from its tensor names and set in the config. The workdir gets the config.json
and the step-0 checkpoint that training writes, so `predict` and `evaluate` use it as a trained run.

Training on the workdir (`flax_detector.main --workdir=OUT` with the same config) resumes from that
checkpoint: step 0, the imported weights, a fresh optimizer state and data order, the same start as
`--config.init_from=FILE` in a new workdir. The optimizer state is built from the import's config, so
settings that shape it (freeze, grad_clip_norm) must match the training's; init_from has no such tie.
The last layer must have one output per class of data.class_names; to fine-tune ImageNet's 1000-class
weights, train with `--config.init_from=FILE` instead, which re-initialises that layer.
"""

import os
import sys

import jax
import ml_collections
import optax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from flax_detector import (
  checkpoint,
  config_overrides,
  config_validation,
  errors,
  finetune,
  inference,
  run_lock,
  train,
)
from flax_detector import workdir as workdir_layout
from flax_detector.models import create_model, init_variables


def _imported_state(config: ml_collections.ConfigDict, pretrained: finetune.Pretrained) -> train.TrainState:
  """The train state training would start from, with every parameter and statistic from `pretrained`."""
  model = create_model(config.model, len(config.data.class_names), frozen_features=config.freeze == "features")
  shapes = jax.eval_shape(lambda: init_variables(model, config.image_size, jax.random.PRNGKey(config.seed)))
  variables = finetune.imported_variables(pretrained, shapes, config)
  optimizer = train.create_optimizer(config, optax.constant_schedule(config.learning_rate))
  return train.create_train_state(config, model, optimizer, variables)


def _check_empty(workdir: epath.Path) -> None:
  checkpoints = workdir / workdir_layout.CHECKPOINTS
  if checkpoints.exists() and any(checkpoints.iterdir()):
    raise errors.UserError(f"--workdir={workdir} already holds checkpoints; import into a new --workdir.")


def import_weights(source: str, workdir: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Writes workdir/config.json and a step-0 checkpoint holding `source`'s weights; returns the config written."""
  pretrained = finetune.from_safetensors(source)
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's may be locked or shared
  if config.model.batch_norm != pretrained.batch_norm:
    logging.info("%s: model.batch_norm=%s, from its tensor names.", source, pretrained.batch_norm)
  config.model.batch_norm = pretrained.batch_norm
  config.init_from = source  # where the weights came from, for whoever reads config.json
  with errors.as_user_errors():
    config = config_validation.validate(config)
  workdir_path = workdir_layout.absolute(workdir)
  _check_empty(workdir_path)
  state = _imported_state(config, pretrained)
  with run_lock.hold(workdir_path):
    checkpoint.save_imported_state(workdir_path / workdir_layout.CHECKPOINTS, state)
    workdir_layout.write_json(workdir_path / workdir_layout.CONFIG, config.to_dict())
  return config


def _define_flags() -> None:
  """Defined only when run as a program, so that importing import_weights() defines no flags."""
  flags.DEFINE_string("source", None, "torchvision vgg16 / vgg16_bn state dict saved as .safetensors.")
  flags.DEFINE_string("workdir", None, "New workdir to write config.json and the step-0 checkpoint into.")
  config_flags.DEFINE_config_file(
    "config",
    "configs/vgg16.py",
    "Config the workdir records (model width, class "
    "names, image size, ...); model.batch_norm is taken from the weights.",
    lock_config=True,
  )
  flags.DEFINE_bool("verbose", False, "Show library log lines (Orbax's checkpoint writing) on stderr.")
  flags.mark_flags_as_required(["source", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  options = flags.FLAGS
  if not options.verbose:
    inference.quiet_library_logs()
  try:
    config = import_weights(options.source, options.workdir, options.config)
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  variant = "vgg16_bn" if config.model.batch_norm else "vgg16"
  print(
    f"Imported {variant} weights from {options.source} into {options.workdir} (checkpoint step 0). Next: "
    f"python -m flax_detector.predict --workdir={options.workdir} IMAGES..."
  )


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main, flags_parser=config_overrides.parse_flags)
