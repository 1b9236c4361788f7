"""Per-image preprocessing: the training augmentations and the deterministic eval transform.

Each op is a small pure function of (image, rng or parameters). Detection traces live in single
pixels, so the default ("crop") keeps native resolution: crops, never rescaling; images smaller
than the crop are zero-padded. "resize" scales the shorter side to the crop size first.
"""

import dataclasses
import io

import ml_collections
import numpy as np
from PIL import Image, ImageFilter

PREPROCESS_MODES = ("crop", "resize")
CROP_POLICIES = ("shared", "pad")


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """The training augmentations a config asks for."""

  flip_probability: float
  jpeg_probability: float
  jpeg_quality_range: tuple[int, int]
  blur_probability: float
  blur_sigma_range: tuple[float, float]

  @classmethod
  def from_config(cls, data: ml_collections.ConfigDict) -> "AugmentOptions":
    """The options of a config that config_validation.validate has accepted."""
    return cls(
      data.flip_probability,
      data.jpeg_probability,
      (data.jpeg_quality_min, data.jpeg_quality_max),
      data.blur_probability,
      (data.blur_sigma_min, data.blur_sigma_max),
    )


def shared_crop_size(sizes: np.ndarray, image_size: int, quantile: float, minimum: int) -> int:
  """The largest crop side, up to `image_size`, that all but a `quantile` share of images can supply unpadded.

  Zero padding is a label when only one class is small: on the public anime data every human image
  (80-130 px) would be padded to 224 and no AI image (512 px). A crop every image can fill keeps
  padding out of training altogether; the few images below the quantile (a 1x1 icon, say) are padded.
  """
  if len(sizes) == 0:
    return image_size
  shorter = np.min(np.asarray(sizes), axis=1)
  supported = int(np.floor(np.quantile(shorter, quantile, method="lower")))
  return max(minimum, min(image_size, supported))


def pad_to_at_least(image: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads bottom/right so both sides are >= size."""
  height, width = image.shape[:2]
  if height >= size and width >= size:
    return image
  return np.pad(image, ((0, max(0, size - height)), (0, max(0, size - width)), (0, 0)))


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) after scaling the shorter side to `size`; Grad-CAM maps views back with the same rule."""
  scale = size / min(height, width)
  return max(size, round(height * scale)), max(size, round(width * scale))


def decoded_side(image_size: int, preprocess_mode: str) -> int | None:
  """The shorter side images are scaled to while decoding: image_size under "resize" (a JPEG is then decoded at
  reduced scale, see data.decode.decode_image); None under "crop", which keeps every native pixel. Training,
  its evaluation, `evaluate` and `predict` all decode this way, so they see the same pixels."""
  return image_size if preprocess_mode == "resize" else None


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  height, width = resized_shape(*image.shape[:2], size)
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
  return image[top : top + size, left : left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  height, width = image.shape[:2]
  return crop(image, int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1)), size)


def flip_horizontally(image: np.ndarray) -> np.ndarray:
  """image[:, ::-1] as a new contiguous array, one channel at a time.

  numpy copies a reversed [H, W, 3] uint8 view three bytes at a time; one strided channel at a time is
  about 4x faster: 0.05 against 0.22 ms for a 224-px crop here (benchmarks/RESULTS.md, session 19).
  """
  flipped = np.empty_like(image)
  for channel in range(image.shape[2]):
    flipped[:, :, channel] = image[:, ::-1, channel]
  return flipped


def jpeg_recompress(image: np.ndarray, quality: int) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return np.asarray(Image.open(buffer).convert("RGB"))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def _resize_or_pad(image: np.ndarray, size: int, mode: str) -> np.ndarray:
  """An image both of whose sides are >= size: scaled first under "resize", zero-padded where still short."""
  if mode == "resize":
    image = resize_shorter_side(image, size)
  return pad_to_at_least(image, size)


def train_transform(
  image: np.ndarray, size: int, mode: str, options: AugmentOptions, rng: np.random.Generator
) -> np.ndarray:
  """Random crop, flip, blur and JPEG re-compression: uint8[H, W, 3] to uint8[size, size, 3].

  Every random draw is made, used or not, so one choice never shifts the others' random streams.
  """
  image = random_crop(_resize_or_pad(image, size, mode), size, rng)
  flip, blur, jpeg = rng.random(3)
  sigma = rng.uniform(*options.blur_sigma_range)
  quality = int(rng.integers(options.jpeg_quality_range[0], options.jpeg_quality_range[1] + 1))
  if flip < options.flip_probability:
    image = flip_horizontally(image)
  if blur < options.blur_probability:
    image = gaussian_blur(image, sigma)
  if jpeg < options.jpeg_probability:
    image = jpeg_recompress(image, quality)
  return np.ascontiguousarray(image)


def grid_offsets(length: int, size: int, grid: int) -> list[int]:
  """`grid` crop offsets spread evenly over [0, length - size]; one crop is centred."""
  if grid == 1:
    return [(length - size) // 2]
  return [round(i * (length - size) / (grid - 1)) for i in range(grid)]


def eval_transform(image: np.ndarray, size: int, mode: str, grid: int = 1) -> np.ndarray:
  """The deterministic views used for evaluation and prediction: uint8[grid * grid, size, size, 3].

  A grid x grid set of crops spread evenly over the image (grid 1: the centre crop), so a
  detector that sees native pixels through a small window still looks at the whole picture.
  """
  image = _resize_or_pad(image, size, mode)
  height, width = image.shape[:2]
  return np.stack(
    [
      crop(image, top, left, size)
      for top in grid_offsets(height, size, grid)
      for left in grid_offsets(width, size, grid)
    ]
  )
