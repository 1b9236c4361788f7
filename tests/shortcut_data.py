"""A size-confounded image folder: in train/ image size alone separates the classes, in test/ it does not.

The public anime data has human images of ~80-130 px and AI images of 512 px, so a detector can score
~100% by learning "small (zero-padded) -> human" instead of a generator's trace. This folder recreates
that confound from the built-in synthetic drawings: both classes come from the same drawing distribution
and are written as PNG, only the upsampler differs (exact bilinear for human-art, the fingerprinted
transposed conv for ai-generated). In train/ human images are small and AI images large; in test/ both
classes share one size range, so only a model that learnt the trace scores well there.
"""

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from flax_detector.data.synthetic import FINGERPRINT_STRENGTH, _draw, generator_kernel, upsample_transposed

CLASS_NAMES = ("human-art", "ai-generated")


@dataclasses.dataclass(frozen=True)
class SideRanges:
  """Inclusive (min, max) side ranges in px for each class, indexed like CLASS_NAMES."""

  human: tuple[int, int]
  ai: tuple[int, int]

  def __getitem__(self, label: int) -> tuple[int, int]:
    return (self.human, self.ai)[label]


# Human sides below the cpu preset's image_size=64, so data.crop_policy=pad must pad every one of them.
TRAIN_SIDES = SideRanges(human=(40, 60), ai=(160, 256))
# Size-matched: both classes from one range.
TEST_SIDES = SideRanges(human=(48, 128), ai=(48, 128))
# Canvas the scenes are drawn on (both classes, both splits) before an image-sized window is cut out.
SCENE_SIDES = (160, 256)


def fingerprinted_image(
  rng: np.random.Generator,
  label: int,
  side_range: tuple[int, int],
  scene_sides: tuple[int, int] | None = SCENE_SIDES,
  strength: float = FINGERPRINT_STRENGTH,
) -> np.ndarray:
  """One uint8[h, w, 3] drawing made as synthetic.py makes its records, with even sides in `side_range`.

  With `scene_sides`, the drawing is rendered on a canvas of that size range and a window of the image's
  size is cut from it, so shapes and strokes have the same pixel scale in every image: otherwise a small
  image packs a whole scene into few pixels (dense edges) and a large one spreads it out (flat areas), a
  second size cue besides the padding. None renders the whole scene at the image's size, as synthetic.py.
  The window is halved and brought back by a stride-2 transposed conv, so sides must be even.
  """
  low, high = side_range
  height, width = (int(side) for side in 2 * rng.integers((low + 1) // 2, high // 2 + 1, 2))
  if scene_sides is None:
    drawing = _draw(rng, height, width)
  else:
    scene_height, scene_width = (
      max(int(side), size) for side, size in zip(rng.integers(scene_sides[0], scene_sides[1] + 1, 2), (height, width))
    )
    top, left = int(rng.integers(0, scene_height - height + 1)), int(rng.integers(0, scene_width - width + 1))
    drawing = _draw(rng, scene_height, scene_width)[top : top + height, left : left + width]
  halved = drawing.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
  image = upsample_transposed(halved, generator_kernel(strength if label == 1 else 0.0))
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_split(
  root: pathlib.Path,
  split: str,
  per_class: int,
  sides: SideRanges,
  seed: int,
  scene_sides: tuple[int, int] | None = SCENE_SIDES,
) -> None:
  """Writes root/split/<class>/NNNNN.png, `per_class` images of each class, reproducibly from `seed`."""
  for label, name in enumerate(CLASS_NAMES):
    folder = root / split / name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(per_class):
      rng = np.random.default_rng((seed, label, index))
      Image.fromarray(fingerprinted_image(rng, label, sides[label], scene_sides)).save(folder / f"{index:05d}.png")


def write_size_confounded_folder(
  root: pathlib.Path,
  train_per_class: int,
  test_per_class: int,
  seeds: Sequence[int] = (1, 2),
  scene_sides: tuple[int, int] | None = SCENE_SIDES,
) -> pathlib.Path:
  """Writes root/{train,test}/{human-art,ai-generated}/*.png: size-confounded train/, size-matched test/."""
  write_split(root, "train", train_per_class, TRAIN_SIDES, seeds[0], scene_sides)
  write_split(root, "test", test_per_class, TEST_SIDES, seeds[1], scene_sides)
  return root
