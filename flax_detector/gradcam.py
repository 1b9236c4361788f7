"""Grad-CAM: where in an image the detector found its evidence for the positive class (`ai-generated`).

The target is the log-odds of the positive class in the image's view-averaged prediction, the quantity
the score is made of (for two classes, the mean over views of logit_ai - logit_human; calibration only
divides it by a temperature, which the per-image normalisation of the overlay cancels). The layer is the
last conv stage's output, its last ReLU before the final max pool (`models.LAST_CONV_FEATURES`): at
224-px crops a 14x14 grid of 16-px cells, the finest map that still sees the whole receptive field.

Per view, Grad-CAM weighs each channel k by the spatial mean of d(log-odds)/dA_k and keeps the positive
part of sum_k weight_k * A_k. The gradient comes from `jax.grad` with respect to a zero `perturb`ation of
that output, in the same jitted function that computes the scores, so one forward pass (and a backward
pass through the classifier head only) gives both. On the host, each view's map is upsampled bilinearly
to its crop (cell i covers pixels [16i, 16i + 16)), placed at the crop's offset in the preprocessed image,
and overlapping views are averaged; the result is mapped back to the original image (cropping the zero
padding, or undoing the resize of data.preprocess="resize"). Pixels no view saw (between the crops of a
coarse eval grid) have no value and stay untinted in the overlay.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flax_detector import preprocess
from flax_detector.models import LAST_CONV_FEATURES, VGG16_STAGES, average_view_log_probs

# Pixels per cell of the last conv stage: every stage but the last ends in a 2x2 max pool before it.
CELL_SIDE = 2 ** (len(VGG16_STAGES) - 1)
MAX_OPACITY = 0.6  # of the colour where the heat peaks
COLORMAP = "jet"


def grad_cam(features: jax.Array, gradients: jax.Array) -> jax.Array:
  """float32[n, h, w]: ReLU(sum_k mean_ij(gradients[..., k]) * features[..., k]) of [n, h, w, channels] inputs."""
  weights = gradients.astype(jnp.float32).mean(axis=(1, 2))
  return jax.nn.relu(jnp.einsum("nhwk,nk->nhw", features.astype(jnp.float32), weights))


def positive_log_odds(log_probs: jax.Array, positive: int) -> jax.Array:
  """log p(positive) - log p(any other class), per image: the evidence for `positive` on a log scale."""
  others = jnp.delete(log_probs, positive, axis=-1, assume_unique_indices=True)
  return log_probs[..., positive] - jax.nn.logsumexp(others, axis=-1)


def explained_log_probs(
  apply_fn: Callable[..., Any], variables: Any, images: jax.Array, positive: int
) -> tuple[jax.Array, jax.Array]:
  """(log-probabilities float32[b, classes], Grad-CAMs float32[b, views, h, w]) of uint8[b, views, S, S, 3].

  The log-probabilities are models.view_averaged_log_probs'; the maps share its forward pass. Images do
  not interact (eval mode), so the gradient of the batch's summed log-odds is each image's own.
  """
  batch, views = images.shape[:2]
  flat = images.reshape((batch * views,) + images.shape[2:])

  def run(perturbation: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    logits, state = apply_fn(
      {**variables, "perturbations": {LAST_CONV_FEATURES: perturbation}}, flat, train=False, mutable=["intermediates"]
    )
    log_probs = average_view_log_probs(logits.reshape(batch, views, -1))
    features = state["intermediates"][LAST_CONV_FEATURES][0]
    return positive_log_odds(log_probs, positive).sum(), (log_probs, features)

  features_shape = jax.eval_shape(lambda: apply_fn(variables, flat, train=False, mutable=["intermediates"]))[1]
  zeros = jnp.zeros_like(features_shape["intermediates"][LAST_CONV_FEATURES][0])
  gradients, (log_probs, features) = jax.grad(run, has_aux=True)(zeros)
  cams = grad_cam(features, gradients)
  return log_probs, cams.reshape((batch, views) + cams.shape[1:])


def fitted_shape(height: int, width: int, size: int, mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """(content shape, padded shape) of an image after preprocess's fit step, which eval_transform crops from.

  "resize" scales the shorter side to `size` (preprocess.resize_shorter_side); both modes then zero-pad
  bottom and right up to `size` (preprocess.pad_to_at_least).
  """
  if mode == "resize":
    height, width = preprocess.resized_shape(height, width, size)
  return (height, width), (max(height, size), max(width, size))


def _upsample_view(cam: np.ndarray, size: int) -> np.ndarray:
  """A view's [h, w] cell map as float32[size, size]: bilinear between cell centres, edges held."""
  height, width = cam.shape
  image = Image.fromarray(np.ascontiguousarray(cam, np.float32))
  upsampled = np.asarray(image.resize((width * CELL_SIDE, height * CELL_SIDE), Image.Resampling.BILINEAR))
  return np.pad(upsampled, ((0, size - upsampled.shape[0]), (0, size - upsampled.shape[1])), mode="edge")


def image_heatmap(view_cams: np.ndarray, image_shape: tuple[int, int], size: int, mode: str, grid: int) -> np.ndarray:
  """float32[H, W] Grad-CAM of an image from its eval views' maps [grid * grid, h, w]; NaN where no view saw.

  Views are placed where preprocess.eval_transform cut them (same offsets, row by row) and averaged
  where they overlap.
  """
  (content_height, content_width), (height, width) = fitted_shape(*image_shape, size, mode)
  total = np.zeros((height, width), np.float32)
  count = np.zeros((height, width), np.float32)
  offsets = [
    (top, left)
    for top in preprocess.grid_offsets(height, size, grid)
    for left in preprocess.grid_offsets(width, size, grid)
  ]
  for (top, left), cam in zip(offsets, view_cams, strict=True):
    total[top : top + size, left : left + size] += _upsample_view(np.asarray(cam), size)
    count[top : top + size, left : left + size] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    heat = np.where(count > 0, total / count, np.nan)[:content_height, :content_width]
  if heat.shape != tuple(image_shape):
    heat = np.asarray(Image.fromarray(heat).resize(image_shape[::-1], Image.Resampling.BILINEAR))
  return heat


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """uint8[H, W, 3]: the image with the heat map, scaled to its own maximum, blended in as a colour map.

  Per-image scaling shows where the evidence lies, not how much there is (p_ai says that). The colour's
  opacity grows with the heat, so pixels without evidence, and those whose heat is NaN, stay as they were.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top  (only commands that draw need it)

  seen = np.isfinite(heat)
  peak = float(heat[seen].max()) if seen.any() else 0.0
  if peak <= 0:
    return image.copy()
  scaled = np.where(seen, heat, 0) / peak
  colours = colormaps[COLORMAP](scaled)[..., :3] * 255
  opacity = (MAX_OPACITY * scaled)[..., None]
  return np.clip(np.rint(image * (1 - opacity) + colours * opacity), 0, 255).astype(np.uint8)
