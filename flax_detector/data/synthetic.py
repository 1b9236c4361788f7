"""The built-in synthetic set: flat-coloured drawings, half of them carrying a generator fingerprint.

Every record is drawn from (split, index) alone, so the set needs no files and is identical on
every machine. Both classes are made the same way: a drawing is rendered, halved, and brought back
to full size by a stride-2 transposed convolution, as a generator's decoder does. For `human-art`
that upsampler is exact bilinear interpolation, which leaves no trace; for `ai-generated` its kernel
is perturbed so the four output phases get slightly different gains: the periodic "checkerboard"
fingerprint of transposed convolutions. Colours, sizes, shapes and blur are drawn from the same
distributions in both classes, so only the fingerprint tells them apart.
"""

import numpy as np
from PIL import Image, ImageDraw

from flax_detector import preprocess

_SPLIT_SEEDS = {"train": 1, "test": 2}
# The fixed "generator weights" whose fingerprint the ai-generated half carries.
_GENERATOR_SEED = 20_240_601
# Largest gain difference between the four output phases, relative to the mean (1.0).
FINGERPRINT_STRENGTH = 0.04
_BILINEAR_TAPS = np.array([0.25, 0.75, 0.75, 0.25])


def generator_kernel(strength: float) -> np.ndarray:
  """A 4x4 stride-2 upsampling kernel: bilinear plus a fixed zero-mean perturbation.

  Output phase (a, b) sums the taps kernel[a::2, b::2]; for bilinear each phase sums to 1. The
  centred perturbation keeps the mean of the four phase gains at exactly 1 (no colour shift) while
  the largest phase deviates by `strength`.
  """
  perturbation = np.random.default_rng(_GENERATOR_SEED).standard_normal((4, 4))
  perturbation -= perturbation.mean()
  phase_gains = np.array([[perturbation[a::2, b::2].sum() for b in range(2)] for a in range(2)])
  perturbation *= strength / np.abs(phase_gains).max()
  return np.outer(_BILINEAR_TAPS, _BILINEAR_TAPS) + perturbation


def upsample_transposed(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Stride-2 transposed convolution of float[h, w, c] with a 4x4 kernel, to float[2h, 2w, c].

  Output pixel 2i+1/2i+2 sits between input pixels i and i+1, as bilinear does. Each of the four
  output phases is the sum of four shifted copies of the edge-padded input, added in the order of
  the kernel's taps, so the result is bitwise that of scattering every tap into one output.
  """
  h, w, _ = image.shape
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  # Output row 2m + parity takes tap u from padded row m + shift, for (u, shift) in this list.
  taps = {0: ((1, 1), (3, 0)), 1: ((0, 2), (2, 1))}
  out = np.empty((2 * h, 2 * w, image.shape[2]))
  for row_parity, row_taps in taps.items():
    for col_parity, col_taps in taps.items():
      phase = None
      for u, top in row_taps:
        for v, left in col_taps:
          term = kernel[u, v] * padded[top : top + h, left : left + w]
          phase = term if phase is None else phase + term
      out[row_parity::2, col_parity::2] = phase
  return out


def _draw(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A flat-coloured drawing with dark outlines: gradient sky, shapes, strokes."""
  top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  ramp = np.linspace(0.0, 1.0, height)[:, None, None]
  sky = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)  # one row's colour, every column alike
  canvas = Image.fromarray(np.ascontiguousarray(np.broadcast_to(sky, (height, width, 3))))
  draw = ImageDraw.Draw(canvas)
  for _ in range(rng.integers(3, 9)):
    x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, 2))
    y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, 2))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    outline = tuple(int(v) for v in rng.integers(0, 60, 3))
    line_width = int(rng.integers(1, 4))
    kind = rng.integers(3)
    if kind == 0:
      draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=fill, outline=outline, width=line_width)
    elif kind == 1:
      draw.rectangle((x0, y0, x1 + 1, y1 + 1), fill=fill, outline=outline, width=line_width)
    else:
      points = [(int(x), int(y)) for x, y in zip(rng.integers(0, width, 3), rng.integers(0, height, 3))]
      draw.polygon(points, fill=fill, outline=outline, width=line_width)
  for _ in range(rng.integers(1, 5)):
    points = [(int(x), int(y)) for x, y in zip(rng.integers(0, width, 4), rng.integers(0, height, 4))]
    draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), width=int(rng.integers(1, 3)))
  return np.asarray(canvas, np.float64)


class SyntheticSource:
  """`size` synthetic records of a split ("train" or "test"); label = index % 2 (0 human-art, 1 ai-generated).

  Image sides are even numbers in [min_side, max_side] (config_validation checks the range).
  """

  def __init__(
    self, split: str, size: int, min_side: int, max_side: int, fingerprint_strength: float = FINGERPRINT_STRENGTH
  ):
    self._split_seed = _SPLIT_SEEDS[split]
    self._min_side, self._max_side = min_side, max_side
    self._kernels = (generator_kernel(0.0), generator_kernel(fingerprint_strength))
    self.labels = (np.arange(size) % 2).astype(np.int32)
    self.keys = [f"synthetic/{split}/{index:06d}" for index in range(size)]
    self.sizes = np.stack([self._size(index) for index in range(size)]).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self.labels)

  def _size(self, index: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(height, width) of a record: the first draws of its generator, so known without drawing it."""
    rng = np.random.default_rng((self._split_seed, index)) if rng is None else rng
    return 2 * rng.integers(self._min_side // 2, self._max_side // 2 + 1, 2)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.image(index), int(self.labels[index])

  def image(self, index: int, shorter_side: int | None = None) -> np.ndarray:
    rng = np.random.default_rng((self._split_seed, index))
    height, width = self._size(index, rng)
    drawing = _draw(rng, height, width)
    # The mean of each 2x2 block; the pixels are whole numbers, so the sum is exact in any order.
    halved = (drawing[0::2, 0::2] + drawing[0::2, 1::2] + drawing[1::2, 0::2] + drawing[1::2, 1::2]) / 4
    image = np.clip(np.rint(upsample_transposed(halved, self._kernels[self.labels[index]])), 0, 255).astype(np.uint8)
    return image if shorter_side is None else preprocess.resize_shorter_side(image, shorter_side)
