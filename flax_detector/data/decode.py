"""Image bytes to RGB uint8 arrays, for every mode Pillow opens, with EXIF orientation applied.

With `shorter_side` (data.preprocess="resize"), the image comes out already scaled so its shorter side is
that many pixels, and a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale first where the result is still
at least that large: a 2048-px JPEG becomes a 224-px image without ever holding its 12 MB of full pixels.
Native-pixel decoding ("crop", the default: generator traces live in single pixels) never uses it.
"""

import io
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageOps

from flax_detector import preprocess, workdir

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
_Read = TypeVar("_Read")
# EXIF orientations that swap width and height when applied.
ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class UnreadableImageError(ValueError):
  """An image file that Pillow cannot decode; the message names the file."""


def _to_rgb(image: Image.Image) -> Image.Image:
  """Converts any Pillow mode to RGB the way a viewer shows it.

  Transparent pixels are composited on white (a transparent PNG drawing is shown on a white page),
  and 16/32-bit grayscale is rescaled instead of clipped, which a plain `convert("RGB")` gets wrong.
  An RGB image comes back as it is: `convert` would copy it.
  """
  if image.mode == "RGB" and "transparency" not in image.info:
    return image
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
      scaled = values / 257.0
    else:
      low, high = float(values.min()), float(values.max())
      scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def transposes(image: Image.Image) -> bool:
  """Whether applying the image's EXIF orientation swaps its width and height; known before decoding."""
  return image.getexif().get(ORIENTATION_TAG) in TRANSPOSING_ORIENTATIONS


def decode_image(data: bytes, name: str, shorter_side: int | None = None) -> np.ndarray:
  """Decodes encoded image bytes to uint8[H, W, 3]; the first frame of an animation.

  With `shorter_side`, returns the image scaled to preprocess.resized_shape of its full size (bicubic), the
  same shape and nearly the same pixels as decoding in full and then resizing; for a JPEG at least twice
  that large, libjpeg's reduced-scale decode (Image.draft) does most of the shrinking for a fraction of the
  work. Raises UnreadableImageError naming `name` when the bytes are not a readable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.seek(0)
      target = None
      if shorter_side is not None:
        height, width = preprocess.resized_shape(image.height, image.width, shorter_side)  # as stored
        image.draft(image.mode, (width, height))  # a no-op for formats other than JPEG
        target = (height, width) if transposes(image) else (width, height)
      ImageOps.exif_transpose(image, in_place=True)  # in place: a copy even where nothing turns otherwise
      rgb = _to_rgb(image)
      if target is not None:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
      return np.asarray(rgb, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise UnreadableImageError(f"{name}: not a readable image ({error}); fix or remove the file") from error


def read_bytes(path: str) -> bytes:
  """The file's encoded bytes (local path or any etils.epath URL such as gs://).

  A local path is read with open(): epath's wrapper costs about 0.06 ms a file, 3% of a training image's
  decode and augmentation (benchmarks/RESULTS.md, session 19).
  Raises UnreadableImageError naming the file when it cannot be read (gone, no permission, network).
  """
  try:
    if workdir.is_url(path):
      return epath.Path(path).read_bytes()
    with open(path, "rb") as file:
      return file.read()
  except OSError as error:
    raise UnreadableImageError(f"{path}: cannot be read ({error})") from error


def read_image(path: str, shorter_side: int | None = None) -> np.ndarray:
  """Reads and decodes an image file (local path or any etils.epath URL such as gs://); see decode_image."""
  return decode_image(read_bytes(path), path, shorter_side)


def read_or_skip(
  read: Callable[[], _Read], consequence: str, warn: Callable[[str], None] = logging.warning
) -> _Read | None:
  """read(), or None after a warning that names the file and says what happens to it instead.

  The one "read the image or warn and skip" path: one unreadable file among 22k should cost that
  file, not a crashed run or command hours in. `consequence` finishes the warning, e.g. "it is
  masked out of its batch and skipped"; `warn` is where the warning goes (the log, or a command's
  stderr line).
  """
  try:
    return read()
  except UnreadableImageError as error:
    warn(f"{error} -- {consequence}.")
    return None
