import numpy as np
from PIL import Image
import pytest

from flax_detector.data.folder import ImageFolderSource

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
  assert sorted(source.keys) == sorted(["train/human-art/a.png", "train/human-art/sub/deeper/b.JPG",
                                        "train/ai-generated/d.WebP", "train/ai-generated/e.jpeg",
                                        "train/ai-generated/f.Bmp", "train/ai-generated/g.gif"])
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
