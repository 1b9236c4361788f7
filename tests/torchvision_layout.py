"""Random VGG16 state dicts in torchvision's layout, written the way torchvision's make_layers counts layers.

Independent of flax_detector.torchvision_weights on purpose: the tests check that module against this
layout, and the torch tests check this layout against torch's own modules (load_state_dict, strict).
"""

import numpy as np
import safetensors.numpy

from flax_detector.models import CLASSIFIER_WIDTH, scaled_width

# torchvision.models.vgg's configuration "D"; "M" is a 2x2 max pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def conv_widths(width_multiplier: float) -> list[int | str]:
  return [value if value == "M" else scaled_width(value, width_multiplier) for value in VGG16_CFG]


def random_state_dict(
  batch_norm: bool, width_multiplier: float, num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Weights scaled so activations stay of order one (softmax not saturated); BN statistics far from 0/1."""
  rng = np.random.default_rng(seed)
  state, index, inputs = {}, 0, 3
  for width in conv_widths(width_multiplier):
    if width == "M":
      index += 1
      continue
    state[f"features.{index}.weight"] = rng.normal(0, np.sqrt(2 / (9 * inputs)), (width, inputs, 3, 3))
    state[f"features.{index}.bias"] = rng.normal(0, 0.1, width)
    if batch_norm:
      state[f"features.{index + 1}.weight"] = rng.uniform(0.5, 1.5, width)
      state[f"features.{index + 1}.bias"] = rng.normal(0, 0.1, width)
      state[f"features.{index + 1}.running_mean"] = rng.normal(0, 0.2, width)
      state[f"features.{index + 1}.running_var"] = rng.uniform(0.5, 2.0, width)
    index, inputs = index + (3 if batch_norm else 2), width
  hidden = scaled_width(CLASSIFIER_WIDTH, width_multiplier)
  linear_shapes = ((hidden, inputs * 49), (hidden, hidden), (num_classes, hidden))  # (out, in)
  for index, (outputs, fan_in) in zip((0, 3, 6), linear_shapes):
    state[f"classifier.{index}.weight"] = rng.normal(0, np.sqrt(1 / fan_in), (outputs, fan_in))
    state[f"classifier.{index}.bias"] = rng.normal(0, 0.1, outputs)
  state = {name: value.astype(np.float32) for name, value in state.items()}
  if batch_norm:  # torch saves this counter with every BatchNorm; the importer ignores it
    state.update(
      {
        name.replace("running_mean", "num_batches_tracked"): np.array(3, np.int64)
        for name in list(state)
        if name.endswith("running_mean")
      }
    )
  return state


def save(state: dict[str, np.ndarray], path) -> str:
  safetensors.numpy.save_file(state, str(path))
  return str(path)
