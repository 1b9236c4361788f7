"""Which library computes the model's convolutions, Dense layers and training BatchNorm: XLA's own, or oneDNN.

`config.model.library`, resolved once per process at trace time:
  "xla":    XLA everywhere.
  "onednn": oneDNN (flax_detector.onednn) for every float32 convolution (stride 1, ungrouped, NHWC),
            Dense layer and training BatchNorm + ReLU it can take (flax_detector.convolution, .matmul,
            .normalization); an error where it cannot run (no libdnnl, not on CPU, several devices).
  "auto":   oneDNN where it can run, XLA otherwise: accelerators, multi-device meshes and bfloat16 get XLA,
            and a missing library only costs speed.

Why: jaxlib 0.10.2 runs VGG16's 3x3 convolutions on x86 CPUs 2-3x slower than oneDNN (the library PyTorch
calls), and the first Dense layer's forward product and kernel gradient about 2x and 1.5x slower. oneDNN
runs as XLA custom calls on XLA's own buffers (flax_detector.xla_ffi), one device's whole arrays per call:
hence the one-device condition (on a mesh of several devices XLA would gather every activation onto one).
"""

import functools

import jax
from absl import logging

from flax_detector import onednn

CHOICES = ("auto", "xla", "onednn")


def onednn_unusable_reason() -> str | None:
  """Why oneDNN cannot compute this process's model, or None when it can."""
  if jax.default_backend() != "cpu":
    return f"the default JAX backend is {jax.default_backend()}, not cpu"
  if jax.device_count() != 1:
    return f"the mesh has {jax.device_count()} devices; oneDNN runs as a custom call on one device only"
  return onednn.why_unavailable()


@functools.cache
def uses_onednn(choice: str) -> bool:
  """Resolves model.library for this process (once per choice: the answer cannot change within it)."""
  if choice not in CHOICES:
    raise ValueError(f"model.library={choice!r}: choose one of {', '.join(CHOICES)}")
  if choice == "xla":
    return False
  reason = onednn_unusable_reason()
  if reason is None:
    logging.info("Convolutions, Dense layers and BatchNorm: oneDNN (model.library=%r).", choice)
    return True
  if choice == "onednn":
    raise ValueError(f'model.library="onednn" cannot run here: {reason}. Use "auto" or "xla".')
  logging.info("Convolutions, Dense layers and BatchNorm: XLA (model.library='auto': %s).", reason)
  return False
