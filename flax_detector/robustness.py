"""Perturbations that break AI-image detectors in practice, for the report's robustness table.

Detectors often key on fragile traces: PNG-versus-JPEG compression, the exact high-frequency statistics
of a generator's upsampling, or image size. Images shared online get re-compressed, resized and
smoothed, so accuracy on clean test files overstates what the detector does in the wild; scoring the
same test set under each of these perturbations shows which traces the model leans on.

Every perturbation is a pure, deterministic function `perturb(image, original_format) -> image` of a
decoded uint8[H, W, 3] image and its file format as Pillow names it ("PNG", "JPEG", ...).
"""

import functools
import types
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image

from flax_detector import preprocess

Perturbation = Callable[[np.ndarray, str], np.ndarray]


def _check(image: np.ndarray) -> np.ndarray:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"need a uint8[H, W, 3] image, got {image.dtype}{list(image.shape)}")
  return image


def jpeg(image: np.ndarray, original_format: str, quality: int) -> np.ndarray:
  """Re-encoded as JPEG at `quality`, whatever the original format: the common case of a re-shared image."""
  del original_format  # every image is re-encoded
  return preprocess.jpeg_recompress(_check(image), quality)


def downscale(image: np.ndarray, original_format: str, factor: float) -> np.ndarray:
  """Each side times `factor`, rounded, at least 1 px, with antialiased (Lanczos) resampling as thumbnails are."""
  del original_format  # resizing ignores how the file was stored
  height, width = _check(image).shape[:2]
  size = (max(1, round(width * factor)), max(1, round(height * factor)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def blur(image: np.ndarray, original_format: str, sigma: float) -> np.ndarray:
  """Gaussian blur of standard deviation `sigma` pixels (Pillow's GaussianBlur radius is the sigma)."""
  del original_format  # blurring ignores how the file was stored
  return preprocess.gaussian_blur(_check(image), sigma)


def png_to_jpeg(image: np.ndarray, original_format: str, quality: int) -> np.ndarray:
  """PNG originals re-encoded as JPEG, others unchanged.

  Separates "the model learnt PNG means AI" from general compression damage: if only PNGs are converted and
  accuracy collapses, the file format was a shortcut.
  """
  if original_format.strip().lstrip(".").upper() != "PNG":
    return _check(image)
  return preprocess.jpeg_recompress(_check(image), quality)


PERTURBATIONS: Mapping[str, Perturbation] = types.MappingProxyType(
  {
    "jpeg_q90": functools.partial(jpeg, quality=90),
    "jpeg_q75": functools.partial(jpeg, quality=75),
    "jpeg_q50": functools.partial(jpeg, quality=50),
    "downscale_0.5": functools.partial(downscale, factor=0.5),
    "downscale_0.25": functools.partial(downscale, factor=0.25),
    "blur_sigma1": functools.partial(blur, sigma=1.0),
    "png_to_jpeg_q95": functools.partial(png_to_jpeg, quality=95),
  }
)
