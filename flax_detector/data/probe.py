"""Checks every file of a folder once, before training: can it be decoded, how large is it, how was it saved.

A bad file found hours into a run costs a crashed or silently skewed run; a 12000x12000 PNG costs an
OOM-killed worker. The probe reads each file once up front (header first, so an oversized image is
refused before a single pixel is decoded) and records what the shortcut audit needs as well: size,
format, colour mode and the JPEG quality its quantisation tables imply. Results are cached by path,
size and mtime, so resuming a run on a 22k-image folder re-reads nothing.
"""

import dataclasses
import io
import json
import os
import warnings
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from flax_detector import workdir
from flax_detector.data.decode import decode_image, transposes

# Bumped when the probe's rules change, so a stale cache is ignored instead of trusted.
_CACHE_VERSION = 1
# Table K.1 of the JPEG standard: the luminance quantisation table that libjpeg scales by quality.
_STANDARD_LUMINANCE_TABLE = np.array(
  [
    16,
    11,
    10,
    16,
    24,
    40,
    51,
    61,
    12,
    12,
    14,
    19,
    26,
    58,
    60,
    55,
    14,
    13,
    16,
    24,
    40,
    57,
    69,
    56,
    14,
    17,
    22,
    29,
    51,
    87,
    80,
    62,
    18,
    22,
    37,
    56,
    68,
    109,
    103,
    77,
    24,
    35,
    55,
    64,
    81,
    104,
    113,
    92,
    49,
    64,
    78,
    87,
    103,
    121,
    120,
    101,
    72,
    92,
    95,
    98,
    112,
    100,
    103,
    99,
  ],
  np.float64,
)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the probe learnt about one file; `error` is None when the image decodes."""

  path: str
  num_bytes: int
  mtime: float
  width: int = 0  # after EXIF orientation, as the decoded image will be
  height: int = 0
  format: str = ""  # Pillow's format name: "PNG", "JPEG", "WEBP", ...
  mode: str = ""  # Pillow's colour mode before conversion to RGB: "RGB", "P", "CMYK", "I;16", ...
  jpeg_quality: int | None = None  # estimated from the quantisation tables; None for other formats
  error: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None


def printable(path: str) -> str:
  """A file name as a person can read it, whatever its bytes (undecodable bytes appear as \\xff)."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def estimate_jpeg_quality(quantization: dict[int, Sequence[int]]) -> int | None:
  """The libjpeg quality (1-100) whose scaled standard table is closest to the file's luminance table.

  Encoders other than libjpeg use other tables; the estimate then names the nearest libjpeg quality,
  which is still what matters for the audit: how coarsely the file was quantised.
  """
  if 0 not in quantization:
    return None
  table = np.asarray(quantization[0], np.float64)
  if table.shape != (64,):
    return None
  best_quality, best_error = None, np.inf
  for quality in range(1, 101):
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    expected = np.clip(np.floor((_STANDARD_LUMINANCE_TABLE * scale + 50) / 100), 1, 255)
    # Pillow reports tables in zigzag or natural order depending on version: compare sorted values too.
    error = min(np.abs(expected - table).sum(), np.abs(np.sort(expected) - np.sort(table)).sum())
    if error < best_error:
      best_quality, best_error = quality, error
  return best_quality


def _read(path: str) -> tuple[bytes, float]:
  """The file's bytes and mtime; remote (gs://) files through etils.epath, where mtime is not known."""
  if workdir.is_url(path):
    return epath.Path(path).read_bytes(), 0.0
  with open(path, "rb") as stream:
    return stream.read(), os.fstat(stream.fileno()).st_mtime


def probe_file(path: str, max_pixels: int, decode: bool = True) -> ImageInfo:
  """Reads the header, refuses images above `max_pixels` before decoding, then (if `decode`) decodes once.

  Decoding is what finds a truncated JPEG; `predict` skips it because it decodes every file anyway.
  """
  try:
    data, mtime = _read(path)
  except OSError as error:
    return ImageInfo(path, 0, 0.0, error=f"cannot be read ({error.strerror or error})")
  base = ImageInfo(path, len(data), mtime)
  if not data:
    return dataclasses.replace(base, error="empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      # Pillow's DecompressionBombWarning names no file; the pixel limit below is ours and does.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if transposes(image):
          width, height = height, width
        info = dataclasses.replace(
          base,
          width=width,
          height=height,
          format=image.format or "",
          mode=image.mode,
          jpeg_quality=estimate_jpeg_quality(getattr(image, "quantization", None) or {}),
        )
  except Image.UnidentifiedImageError:
    return dataclasses.replace(base, error="not an image (no format Pillow reads)")
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    return dataclasses.replace(base, error=f"not a readable image ({error})")
  if width * height > max_pixels:
    return dataclasses.replace(
      info, error=f"too large: {width}x{height} = {width * height} pixels exceeds data.max_image_pixels={max_pixels}"
    )
  if not decode:
    return info
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      decode_image(data, printable(path))
  except ValueError as error:  # UnreadableImageError: truncated or damaged pixel data
    return dataclasses.replace(info, error=str(error.__cause__ or error))
  return info


def _cache_key(path: str, max_pixels: int) -> str:
  return printable(path) + f"|{max_pixels}"


def load_cache(path: epath.Path | None) -> dict[str, dict[str, Any]]:
  """Cached probe results, or {} when there is no usable cache (missing, damaged or from an older probe)."""
  if path is None or not path.exists():
    return {}
  try:
    payload = json.loads(path.read_text())
  except (OSError, ValueError):
    logging.warning("%s: unreadable probe cache, probing every file again", path)
    return {}
  return payload.get("entries", {}) if payload.get("version") == _CACHE_VERSION else {}


def save_cache(path: epath.Path, infos: Sequence[ImageInfo], max_pixels: int) -> None:
  """Adds `infos` to the cache at `path` (both splits share one file), written atomically."""
  entries = load_cache(path)
  entries.update({_cache_key(info.path, max_pixels): dataclasses.asdict(info) for info in infos})
  temporary = path.parent / f".{path.name}.tmp"
  temporary.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}))
  temporary.replace(path)


def _unchanged(entry: dict[str, Any], path: str) -> bool:
  try:
    stat = os.stat(path)
  except OSError:
    return False
  return entry["num_bytes"] == stat.st_size and entry["mtime"] == stat.st_mtime


def probe_files(
  paths: Sequence[str],
  max_pixels: int,
  cache_path: epath.Path | None = None,
  *,
  update_cache: bool = True,
  decode: bool = True,
  num_threads: int = 8,
) -> list[ImageInfo]:
  """ImageInfo of every path, in order; local files unchanged since `cache_path` was written are not read again."""
  cache = load_cache(cache_path) if decode else {}

  def cached_or_probe(path: str) -> ImageInfo:
    entry = cache.get(_cache_key(path, max_pixels))
    if entry is not None and not workdir.is_url(path) and _unchanged(entry, path):
      return ImageInfo(**{**entry, "path": path})
    return probe_file(path, max_pixels, decode)

  with futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    infos = list(pool.map(cached_or_probe, paths))
  if cache_path is not None and decode and update_cache:
    save_cache(cache_path, infos, max_pixels)
  return infos
