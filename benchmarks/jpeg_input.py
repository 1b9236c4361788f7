"""JPEG input figures for benchmarks/RESULTS.md: a folder of 512-px JPEGs, and decode + resize speed.

  python -m benchmarks.jpeg_input folder /tmp/jpeg512 --per_class=400   # train/ and test/, both classes
  python -m benchmarks.jpeg_input decode                                # full decode vs reduced-scale decode

The folder feeds `python -m flax_detector.benchmark --parts=input --config.data.dir=/tmp/jpeg512`. `decode`
times, in one process with rounds alternating, what data.preprocess="resize" cost before reduced-scale
decoding (full decode, then the shorter side to 224) against decode_image(..., shorter_side=224).
"""

import argparse
import io
import pathlib
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from flax_detector import preprocess
from flax_detector.data.decode import decode_image

CLASS_NAMES = ("human-art", "ai-generated")


def photo_like(side: int, rng: np.random.Generator) -> Image.Image:
  """Smooth random colour fields with fine noise: compresses and decodes like a drawing, not like flat noise."""
  low = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
  noisy = np.asarray(low, np.int16) + rng.integers(-12, 13, (side, side, 3))
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_folder(root: pathlib.Path, per_class: int, side: int = 512) -> None:
  rng = np.random.default_rng(0)
  for split, count in (("train", per_class), ("test", max(1, per_class // 4))):
    for name in CLASS_NAMES:
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for index in range(count):
        photo_like(side, rng).save(folder / f"{index:05d}.jpg", quality=90)


def _best_ms(run: Callable[[], object], repeats: int, rounds: int = 5) -> float:
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      run()
    times.append((time.perf_counter() - start) / repeats * 1e3)
  return min(times)


def time_decode(target: int = 224) -> None:
  rng = np.random.default_rng(0)
  for side, repeats in ((512, 40), (2048, 6)):
    buffer = io.BytesIO()
    photo_like(side, rng).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    before = _best_ms(lambda data=data: preprocess.resize_shorter_side(decode_image(data, "full"), target), repeats)
    after = _best_ms(lambda data=data: decode_image(data, "reduced", shorter_side=target), repeats)
    print(
      f"{side}-px JPEG -> {target}: full decode + resize {before:.2f} ms, reduced-scale {after:.2f} ms, "
      f"{before / after:.2f}x"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  folder = commands.add_parser("folder", help="write DIR/{train,test}/<class>/*.jpg, 512 px")
  folder.add_argument("dir", type=pathlib.Path)
  folder.add_argument("--per_class", type=int, default=400, help="training images per class (test: a quarter)")
  commands.add_parser("decode", help="time decode + resize of a 512-px and a 2048-px JPEG to 224")
  args = parser.parse_args()
  if args.command == "folder":
    write_folder(args.dir, args.per_class)
  else:
    time_decode()


if __name__ == "__main__":
  main()
