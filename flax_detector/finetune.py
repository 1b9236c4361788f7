"""Starting from pretrained weights: where they come from, how they fit the configured model, what stays fixed.

`config.init_from` names a torchvision VGG16 / VGG16-BN state dict saved as .safetensors, or another
flax_detector workdir. Its weights replace the freshly initialised ones at a fresh start only: a resumed
run restores its own checkpoint. The optimizer state stays fresh (zero moments, step 0), since moments of
another task's training would point the first steps in that task's direction.

A head with another class count (ImageNet's 1000 against 2 here) is re-initialised from config.seed and
the log says so; any other shape that differs is an error naming the tensor, because it means another
width (model.width_multiplier) and nothing useful could be loaded.

`config.freeze="features"` trains only the classifier. The frozen convolutions and BatchNorm layers get no
optimizer state (optax.multi_transform with set_to_zero: no Adam moments, no weight decay) and no gradient,
and BatchNorm normalises with its running statistics during training too, which stay as loaded: the
features are then the same fixed function of the image in training and in inference, where batch
statistics would make them depend on the batch and drift from what the classifier is evaluated on.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from flax_detector import torchvision_weights, workdir
from flax_detector.checkpoint import restore_model_variables
from flax_detector.models import create_model, init_variables
from flax_detector.torchvision_weights import WeightsFileError

HEAD = "Dense_2"  # the last classifier layer: one output per class

LeafPath = tuple[str, ...]  # ("params", "Conv_0", "kernel")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Weights in this model's names and layouts (numpy), and how to name a leaf the way the source does."""

  variables: dict[str, Any]  # {"params": ..., "batch_stats": ...}
  source: str
  batch_norm: bool
  # (leaf path, shape found, shape needed) -> "classifier.6.weight has shape (1000, 4096), the model needs (2, 4096)"
  describe_mismatch: Callable[[LeafPath, tuple[int, ...], tuple[int, ...]], str]


def from_safetensors(path: str) -> Pretrained:
  """A torchvision VGG16 or VGG16-BN state dict; BatchNorm or not is read from its tensor names."""
  state_dict = torchvision_weights.read_state_dict(path)
  batch_norm = torchvision_weights.has_batch_norm(state_dict)
  tensors = {tensor.path: tensor for tensor in torchvision_weights.vgg16_tensors(batch_norm)}

  def describe_mismatch(path: LeafPath, found: tuple[int, ...], needed: tuple[int, ...]) -> str:
    tensor = tensors[path]
    return (
      f"{tensor.torch_name} has shape {torchvision_weights.torch_layout_shape(tensor, found)}, the model "
      f"needs {torchvision_weights.torch_layout_shape(tensor, needed)}"
    )

  return Pretrained(torchvision_weights.to_flax_variables(state_dict, path), path, batch_norm, describe_mismatch)


def _from_workdir(path: str) -> Pretrained:
  """The newest usable checkpoint of another run, restored as numpy with that run's own model shapes."""
  config = workdir.load_config(path)
  model = create_model(config.model, len(config.data.class_names))
  shapes = jax.eval_shape(lambda: init_variables(model, config.image_size, jax.random.PRNGKey(0)))
  on_host = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), shapes)  # no sharding: numpy
  variables, step = restore_model_variables(epath.Path(path) / workdir.CHECKPOINTS, on_host)

  def describe_mismatch(leaf: LeafPath, found: tuple[int, ...], needed: tuple[int, ...]) -> str:
    return f"{'/'.join(leaf)} has shape {found}, the model needs {needed}"

  return Pretrained(variables, f"{path} (step {step})", config.model.batch_norm, describe_mismatch)


def load_pretrained(path: str) -> Pretrained:
  """config.init_from's weights: a flax_detector workdir, or else a torchvision .safetensors file."""
  if (epath.Path(path) / workdir.CONFIG).exists():
    return _from_workdir(path)
  return from_safetensors(path)


def fitted_leaves(
  pretrained: Pretrained, target: dict[str, Any], config: ml_collections.ConfigDict, *, new_head_allowed: bool
) -> dict[LeafPath, np.ndarray]:
  """The pretrained value of every leaf of `target` ({"params", "batch_stats"}, arrays or shapes).

  With `new_head_allowed`, a head whose class count differs is left out (the caller keeps its fresh
  initialisation); every other difference raises WeightsFileError naming the tensors.
  """
  if pretrained.batch_norm != config.model.batch_norm:
    raise WeightsFileError(
      f"{pretrained.source} holds a VGG16 {'with' if pretrained.batch_norm else 'without'} BatchNorm, the "
      f"config has model.batch_norm={config.model.batch_norm}: set --config.model.batch_norm="
      f"{pretrained.batch_norm}."
    )
  leaves, mismatches = {}, {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    path = _path(key_path)
    value = pretrained.variables[path[0]][path[1]][path[2]]
    if value.shape == leaf.shape:
      leaves[path] = value
    elif not (new_head_allowed and path[1] == HEAD and value.shape[:-1] == leaf.shape[:-1]):
      mismatches[path] = pretrained.describe_mismatch(path, value.shape, leaf.shape)
  if mismatches:
    raise WeightsFileError(_mismatch_message(pretrained.source, mismatches, config))
  return leaves


def _mismatch_message(source: str, mismatches: dict[LeafPath, str], config: ml_collections.ConfigDict) -> str:
  first = sorted(mismatches, key=lambda path: path[0] != "params")[:3]  # weights say more than statistics
  message = (
    f"{source} does not fit the configured model ({len(mismatches)} tensors differ): "
    f"{'; '.join(mismatches[path] for path in first)}. model.width_multiplier="
    f"{config.model.width_multiplier} scales every layer and the last layer has one output per class of "
    f"data.class_names ({len(config.data.class_names)})."
  )
  if all(path[1] == HEAD for path in mismatches):
    message += (
      " To fine-tune weights with another class count, train with --config.init_from, which "
      "re-initialises the last layer."
    )
  return message


def _log_head(pretrained: Pretrained, leaves: dict[LeafPath, np.ndarray], target: dict[str, Any]) -> None:
  if ("params", HEAD, "bias") in leaves:
    return
  logging.info(
    "init_from %s: its last layer (%s) has %d classes, this model %d: that layer is re-initialised "
    "from config.seed, every other layer is loaded.",
    pretrained.source,
    HEAD,
    pretrained.variables["params"][HEAD]["bias"].shape[0],
    target["params"][HEAD]["bias"].shape[0],
  )


def _path(key_path: Any) -> LeafPath:
  return tuple(entry.key for entry in key_path)


def imported_variables(
  pretrained: Pretrained, shapes: dict[str, Any], config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """Every leaf of `shapes` ({"params", "batch_stats"} of the configured model) from `pretrained`, or an error."""
  leaves = fitted_leaves(pretrained, shapes, config, new_head_allowed=False)
  return jax.tree_util.tree_map_with_path(
    lambda key_path, leaf: jnp.asarray(leaves[_path(key_path)], leaf.dtype), shapes
  )


def _place(value: np.ndarray, like: jax.Array) -> jax.Array:
  """`value` as a global array with `like`'s dtype and sharding (any mesh, any number of processes)."""
  value = value.astype(like.dtype)
  return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def start_from_init_from(state: Any, config: ml_collections.ConfigDict) -> Any:
  """A fresh run's state with config.init_from's params and batch_stats; its optimizer state stays fresh.

  A head with another class count keeps the state's fresh initialisation.
  """
  pretrained = load_pretrained(config.init_from)
  current = {"params": state.params, "batch_stats": state.batch_stats}
  leaves = fitted_leaves(pretrained, current, config, new_head_allowed=True)
  _log_head(pretrained, leaves, current)

  def loaded_or_fresh(key_path: Any, leaf: jax.Array) -> jax.Array:
    path = _path(key_path)
    return _place(leaves[path], leaf) if path in leaves else leaf

  replaced = jax.tree_util.tree_map_with_path(loaded_or_fresh, current)
  logging.info("Initialised %d of %d arrays from %s.", len(leaves), len(jax.tree.leaves(current)), pretrained.source)
  return state.replace(params=replaced["params"], batch_stats=replaced["batch_stats"])


def _freeze_labels(params: Any) -> Any:
  """Everything before the classifier (the convolutions and their BatchNorm layers) is a feature."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "trained" if path[0].key.startswith("Dense_") else "frozen", params
  )


def apply_freeze(optimizer: optax.GradientTransformation, freeze: str) -> optax.GradientTransformation:
  """`optimizer` on the trained parameters only; frozen ones get zero updates and no optimizer state."""
  if freeze == "none":
    return optimizer
  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, _freeze_labels)
