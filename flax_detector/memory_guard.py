"""Refuses a crop size or batch whose training step cannot fit, before anything is compiled.

An `image_size=1000` run used to compile for minutes and then be OOM-killed (on a CPU host, taking the
machine's other work with it). VGG16's memory is dominated by its activations, which are easy to count
exactly from the layer shapes; comparing that count with the device's memory turns the crash into one
line that names the estimate, the limit and the setting to change.
"""

import dataclasses

import jax
import jax.numpy as jnp
import psutil

from flax_detector.models import VGG16_STAGES, scaled_width

# Activations kept for the backward pass are matched by their gradients while it runs, and XLA keeps
# a few more buffers live around the largest layers: twice the saved activations is the floor a step needs.
_BACKWARD_FACTOR = 2.0
# Parameters, their gradients and AdamW's two moments.
_STATE_COPIES = 4
# Share of the memory a step may plan to use; the rest is the runtime's, the input pipeline's and the OS's.
_USABLE_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes a training step needs where its devices share one memory, and what that memory holds."""

  needed: int
  limit: int
  where: str

  @property
  def fits(self) -> bool:
    return self.needed <= self.limit


def activation_bytes_per_example(image_size: int, width_multiplier: float, batch_norm: bool, dtype_bytes: int) -> int:
  """Bytes of the activations VGG16 saves for the backward pass, for one image.

  Per conv: its output, the BatchNorm output (if any) and the ReLU output; per stage the pooled output.
  """
  total, side = 0, image_size
  tensors_per_conv = 3 if batch_norm else 2
  for stage in VGG16_STAGES:
    for width in stage:
      total += side * side * scaled_width(width, width_multiplier) * tensors_per_conv
    side //= 2
    total += side * side * scaled_width(stage[-1], width_multiplier)
  return total * dtype_bytes


def estimate_train_step(
  image_size: int,
  local_batch: int,
  width_multiplier: float,
  batch_norm: bool,
  dtype_bytes: int,
  state_bytes_per_device: int,
) -> MemoryEstimate:
  """The step's need against this host's memory (CPU devices share it) or one accelerator's memory."""
  devices = jax.local_devices()
  per_example = activation_bytes_per_example(image_size, width_multiplier, batch_norm, dtype_bytes)
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    per_device_batch = max(1, local_batch // len(devices))
    needed = _BACKWARD_FACTOR * per_example * per_device_batch + _STATE_COPIES * state_bytes_per_device
    return MemoryEstimate(int(needed), int(_USABLE_SHARE * stats["bytes_limit"]), f"one {devices[0].device_kind}")
  needed = _BACKWARD_FACTOR * per_example * local_batch + _STATE_COPIES * state_bytes_per_device * len(devices)
  available = psutil.virtual_memory().available
  return MemoryEstimate(int(needed), int(_USABLE_SHARE * available), "this host's available memory")


def check_train_step(
  image_size: int, local_batch: int, width_multiplier: float, batch_norm: bool, dtype: str, state_bytes_per_device: int
) -> MemoryEstimate:
  """Raises ValueError naming the estimate, the limit and the settings when the step cannot fit."""
  estimate = estimate_train_step(
    image_size, local_batch, width_multiplier, batch_norm, jnp.dtype(dtype).itemsize, state_bytes_per_device
  )
  if not estimate.fits:
    raise ValueError(
      f"image_size={image_size} with {local_batch} images per host needs about {estimate.needed / 2**30:.1f} GiB "
      f"for one training step, more than {estimate.where} allows ({estimate.limit / 2**30:.1f} GiB). Lower "
      f"--config.image_size or --config.batch_size (or use more devices)."
    )
  return estimate
