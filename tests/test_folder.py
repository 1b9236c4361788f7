import io
import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from flax_detector.data import probe
from flax_detector.data.folder import ImageFolderSource, IndexOptions, skipped_lines
from flax_detector.data.sources import split_off_validation

CLASSES = ("human-art", "ai-generated")


def _image(path, value=0, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (8, 6), (value, value, value)).save(path, format=fmt)


def test_nested_files_any_case_and_hidden_entries_skipped(tmp_path):
  _image(tmp_path / "train/human-art/a.png")
  _image(tmp_path / "train/human-art/sub/deeper/b.JPG", fmt="JPEG")
  _image(tmp_path / "train/human-art/.hidden.png")
  _image(tmp_path / "train/human-art/.cache/c.png")
  (tmp_path / "train/human-art/notes.txt").write_text("not an image")
  _image(tmp_path / "train/ai-generated/d.WebP", fmt="WEBP")
  _image(tmp_path / "train/ai-generated/e.jpeg", fmt="JPEG")
  _image(tmp_path / "train/ai-generated/f.Bmp", fmt="BMP")
  _image(tmp_path / "train/ai-generated/g.gif", value=9, fmt="GIF")
  source = ImageFolderSource(str(tmp_path), "train", CLASSES)
  assert sorted(source.keys) == sorted(
    [
      "train/human-art/a.png",
      "train/human-art/sub/deeper/b.JPG",
      "train/ai-generated/d.WebP",
      "train/ai-generated/e.jpeg",
      "train/ai-generated/f.Bmp",
      "train/ai-generated/g.gif",
    ]
  )
  np.testing.assert_array_equal(np.bincount(source.labels), [2, 4])
  image, label = source[source.keys.index("train/ai-generated/g.gif")]
  assert image.shape == (6, 8, 3) and label == 1


def test_missing_folders_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.dir="):
    ImageFolderSource(str(tmp_path / "nowhere"), "train", CLASSES)
  with pytest.raises(FileNotFoundError, match="train"):
    ImageFolderSource(str(tmp_path), "train", CLASSES)
  _image(tmp_path / "train/human-art/a.png")
  with pytest.raises(FileNotFoundError, match="ai-generated"):
    ImageFolderSource(str(tmp_path), "train", CLASSES)
  (tmp_path / "train/ai-generated").mkdir()
  with pytest.raises(ValueError, match="no images"):
    ImageFolderSource(str(tmp_path), "train", CLASSES)


def _awkward_folder(root):
  """Real-world oddities: every mode and format people save, plus files that cannot be used."""
  folder = root / "train/human-art"
  folder.mkdir(parents=True)
  rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
  Image.fromarray(rgb).convert("P").save(folder / "palette.png")
  Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)).save(folder / "sixteen_bit.png")
  rotated = Image.fromarray(rgb)
  exif = rotated.getexif()
  exif[0x0112] = 6  # rotate 90 degrees when shown
  rotated.save(folder / "rotated.jpg", exif=exif)
  Image.fromarray(rgb).save(folder / "lossless.webp", lossless=True)
  Image.fromarray(rgb).save(folder / "animated.gif")
  Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "one_pixel.png")
  Image.new("RGB", (4000, 300), (50, 60, 70)).save(folder / "panorama.PNG")
  Image.fromarray(rgb).save(folder / "UPPER.JPEG")
  (folder / ".hidden").mkdir()
  Image.fromarray(rgb).save(folder / ".hidden/ignored.png")
  Image.fromarray(rgb).save(os.path.join(os.fsencode(folder), b"bad\xff\xfe.png"))
  os.symlink(".", folder / "loop")
  os.symlink(folder / "palette.png", folder / "same_as_palette.png")
  full = io.BytesIO()
  Image.fromarray(rgb).save(full, format="JPEG")
  (folder / "truncated.jpg").write_bytes(full.getvalue()[:200])
  (folder / "empty.png").write_bytes(b"")
  (folder / "text.png").write_text("this is not an image")
  Image.new("RGB", (3000, 3000)).save(folder / "huge.png")
  readable = [
    "cmyk.jpg",
    "palette.png",
    "sixteen_bit.png",
    "rotated.jpg",
    "lossless.webp",
    "animated.gif",
    "one_pixel.png",
    "panorama.PNG",
    "UPPER.JPEG",
    "bad\udcff\udcfe.png",
  ]
  unusable = ["truncated.jpg", "empty.png", "text.png", "huge.png"]
  return folder, readable, unusable


def test_awkward_folder_counts_each_readable_image_once_and_lists_the_rest(tmp_path, caplog):
  folder, readable, unusable = _awkward_folder(tmp_path)
  _image(tmp_path / "train/ai-generated/a.png")
  options = IndexOptions(max_image_pixels=5_000_000, cache_path=tmp_path / "cache.json")
  source = ImageFolderSource(str(tmp_path), "train", CLASSES, options)
  assert sorted(source.keys) == sorted([f"train/human-art/{name}" for name in readable] + ["train/ai-generated/a.png"])
  assert sorted(os.path.basename(info.path) for info in source.skipped) == sorted(unusable)
  lines = skipped_lines(source.skipped)
  assert all(line.count("\t") == 1 for line in lines) and any("too large" in line for line in lines)
  assert "leads back to" in caplog.text and "counted once" in caplog.text  # the loop and the second link
  rotated = source.sizes[source.keys.index("train/human-art/rotated.jpg")]
  assert tuple(rotated) == (50, 40)  # EXIF orientation applied, as the decoded image will be
  for index in range(len(source)):
    image, _ = source[index]
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[:2] == tuple(source.sizes[index])
  split_train, _ = split_off_validation(source, 0.5)  # a non-UTF-8 key hashes by its bytes
  assert len(split_train) <= len(source)

  # Resuming re-reads nothing: the probe results come from the cache while size and mtime match.
  with mock.patch.object(probe, "probe_file", side_effect=AssertionError("probed again")):
    again = ImageFolderSource(str(tmp_path), "train", CLASSES, options)
  assert again.keys == source.keys


def test_strict_policy_stops_before_training_naming_the_file(tmp_path):
  _image(tmp_path / "train/human-art/a.png")
  _image(tmp_path / "train/ai-generated/b.png")
  (tmp_path / "train/ai-generated/broken.png").write_bytes(b"nope")
  with pytest.raises(ValueError, match="broken.png.*on_bad_file=skip"):
    ImageFolderSource(str(tmp_path), "train", CLASSES, IndexOptions(on_bad_file="error"))
