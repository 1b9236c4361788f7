"""torchvision's VGG16 / VGG16-BN state dict, read from safetensors, as this model's Flax variables.

torchvision names layers by their index in an nn.Sequential (`features.N`, `classifier.{0,3,6}`), stores
convolutions as OIHW and linear layers as (out, in), and flattens the pooled 512x7x7 activations channel
first (NCHW). This model is NHWC: kernels are HWIO and (in, out), and the first classifier layer reads
the pooled activations flattened as (7, 7, 512). Only numpy and the `safetensors` package are needed, so
converting weights never requires PyTorch.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from flax_detector import errors, workdir
from flax_detector.models import POOLED_SIDE, VGG16_STAGES

# torchvision's classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
CLASSIFIER_INDICES = (0, 3, 6)
# BatchNorm's update counter: torch-only bookkeeping, nothing in Flax corresponds to it.
IGNORED_SUFFIX = ".num_batches_tracked"
# torch tensor name of each Flax leaf, per kind of layer: (collection, leaf name, torch name).
_LEAVES = {
  "conv": (("params", "kernel", "weight"), ("params", "bias", "bias")),
  "dense": (("params", "kernel", "weight"), ("params", "bias", "bias")),
  "batch_norm": (
    ("params", "scale", "weight"),
    ("params", "bias", "bias"),
    ("batch_stats", "mean", "running_mean"),
    ("batch_stats", "var", "running_var"),
  ),
}


class WeightsFileError(errors.UserError, ValueError):
  """A weights file that is not a torchvision VGG16 state dict, or does not fit the configured model."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One torch tensor and the Flax leaf it becomes."""

  torch_name: str  # "features.0.weight"
  collection: str  # "params" or "batch_stats"
  module: str  # "Conv_0"
  leaf: str  # "kernel"
  kind: str  # "conv", "batch_norm" or "dense"

  @property
  def path(self) -> tuple[str, str, str]:
    return self.collection, self.module, self.leaf


def _layers(batch_norm: bool) -> Iterator[tuple[str, str, str]]:
  """(Flax module name, torch prefix, kind) of every layer with weights, in order."""
  index = conv = 0
  for stage in VGG16_STAGES:
    for _ in stage:
      yield f"Conv_{conv}", f"features.{index}", "conv"
      if batch_norm:
        yield f"BatchNorm_{conv}", f"features.{index + 1}", "batch_norm"
      index += 3 if batch_norm else 2  # conv, [batch norm], ReLU
      conv += 1
    index += 1  # max pool
  for dense, index in enumerate(CLASSIFIER_INDICES):
    yield f"Dense_{dense}", f"classifier.{index}", "dense"


def vgg16_tensors(batch_norm: bool) -> list[Tensor]:
  """Every tensor of torchvision's vgg16 (or vgg16_bn) state dict, apart from num_batches_tracked."""
  return [
    Tensor(f"{prefix}.{torch_leaf}", collection, module, leaf, kind)
    for module, prefix, kind in _layers(batch_norm)
    for collection, leaf, torch_leaf in _LEAVES[kind]
  ]


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file by name."""
  try:
    if workdir.is_url(path):
      tensors = safetensors.numpy.load(epath.Path(path).read_bytes())
    else:
      tensors = safetensors.numpy.load_file(str(path))
  except (OSError, safetensors.SafetensorError) as error:
    raise WeightsFileError(
      f"{path}: cannot be read as safetensors ({error}). Save the state dict with "
      f"safetensors.torch.save_file(model.state_dict(), PATH)."
    ) from error
  return tensors


def has_batch_norm(state_dict: dict[str, np.ndarray]) -> bool:
  """torchvision's vgg16_bn has running statistics; vgg16 has none."""
  return any(name.endswith(".running_mean") for name in state_dict)


def torch_layout_shape(tensor: Tensor, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape the torch tensor has when the Flax leaf has `flax_shape` (for messages)."""
  if tensor.leaf != "kernel":
    return tuple(flax_shape)
  if tensor.kind == "conv":
    height, width, inputs, outputs = flax_shape
    return outputs, inputs, height, width
  return tuple(reversed(flax_shape))


def _flax_leaf(tensor: Tensor, value: np.ndarray, source: str) -> np.ndarray:
  """One torch tensor in this model's layout; the first linear layer's inputs reordered NCHW -> NHWC."""
  expected_rank = {"conv": 4, "dense": 2}[tensor.kind] if tensor.leaf == "kernel" else 1
  if value.ndim != expected_rank:
    raise WeightsFileError(
      f"{source}: {tensor.torch_name} has shape {value.shape}; a torchvision VGG16 has a "
      f"{expected_rank}-D tensor there."
    )
  if tensor.leaf != "kernel":
    return value
  if tensor.kind == "conv":
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if tensor.module != "Dense_0":
    return value.T
  outputs, inputs = value.shape
  cells = POOLED_SIDE * POOLED_SIDE
  if inputs % cells:
    raise WeightsFileError(
      f"{source}: {tensor.torch_name} has shape {value.shape}; its inputs must be the "
      f"channels of a {POOLED_SIDE}x{POOLED_SIDE} pooled map (a multiple of {cells})."
    )
  channels = inputs // cells
  # torch input index c*49 + h*7 + w; this model's (h*7 + w)*channels + c.
  by_position = value.reshape(outputs, channels, POOLED_SIDE, POOLED_SIDE).transpose(2, 3, 1, 0)
  return by_position.reshape(cells * channels, outputs)


def _check_names(state_dict: dict[str, np.ndarray], tensors: list[Tensor], source: str) -> None:
  expected = {tensor.torch_name for tensor in tensors}
  names = {name for name in state_dict if not name.endswith(IGNORED_SUFFIX)}
  missing, unexpected = sorted(expected - names), sorted(names - expected)
  if missing or unexpected:
    variant = "vgg16_bn" if has_batch_norm(state_dict) else "vgg16"
    raise WeightsFileError(
      f"{source}: not a torchvision {variant} state dict: {len(missing)} tensors missing "
      f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}. Save torchvision.models.{variant}()"
      f".state_dict() (the whole model's, not a wrapper's: names start with features. and classifier.)."
    )


def to_flax_variables(state_dict: dict[str, np.ndarray], source: str) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """{"params": ..., "batch_stats": ...} with this model's names and layouts; BatchNorm or not from the names.

  num_batches_tracked is ignored.
  """
  tensors = vgg16_tensors(has_batch_norm(state_dict))
  _check_names(state_dict, tensors, source)
  variables: dict[str, dict[str, dict[str, np.ndarray]]] = {"params": {}, "batch_stats": {}}
  for tensor in tensors:
    value = _flax_leaf(tensor, np.asarray(state_dict[tensor.torch_name]), source)
    variables[tensor.collection].setdefault(tensor.module, {})[tensor.leaf] = value
  return variables
