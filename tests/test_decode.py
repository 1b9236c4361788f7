import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from flax_detector import preprocess
from flax_detector.data.decode import UnreadableImageError, decode_image, read_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def test_palette_with_transparency_is_composited_on_white():
  image = Image.new("P", (4, 4), 0)
  image.putpalette([255, 0, 0] + [0, 0, 255] * 255)
  image.putpixel((0, 0), 1)
  decoded = decode_image(_encode(image, "PNG", transparency=0), "palette.png")
  assert decoded.dtype == np.uint8 and decoded.shape == (4, 4, 3)
  np.testing.assert_array_equal(decoded[1, 1], [255, 255, 255])  # index 0 is transparent
  np.testing.assert_array_equal(decoded[0, 0], [0, 0, 255])


def test_rgba_and_la_alpha_composited_on_white():
  rgba = Image.new("RGBA", (2, 2), (200, 0, 0, 0))
  rgba.putpixel((0, 0), (200, 0, 0, 255))
  decoded = decode_image(_encode(rgba, "PNG"), "rgba.png")
  np.testing.assert_array_equal(decoded[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(decoded[1, 1], [255, 255, 255])
  la = Image.new("LA", (2, 2), (0, 128))
  np.testing.assert_array_equal(decode_image(_encode(la, "PNG"), "la.png")[0, 0], [127, 127, 127])


def test_cmyk_and_grayscale_become_rgb():
  cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red
  decoded = decode_image(_encode(cmyk, "JPEG", quality=100), "cmyk.jpg")
  assert decoded.shape == (3, 3, 3) and decoded[1, 1, 0] > 240 and decoded[1, 1, 1:].max() < 15
  gray = decode_image(_encode(Image.new("L", (3, 3), 77), "PNG"), "gray.png")
  np.testing.assert_array_equal(gray[0, 0], [77, 77, 77])


def test_16_bit_grayscale_is_rescaled_not_clipped():
  values = np.array([[0, 32896], [65535, 257]], np.uint16)
  decoded = decode_image(_encode(Image.fromarray(values), "PNG"), "deep.png")
  np.testing.assert_array_equal(decoded[..., 0], [[0, 128], [255, 1]])


def test_exif_orientation_is_applied():
  image = Image.new("RGB", (4, 2), (0, 0, 0))
  image.putpixel((0, 0), (255, 255, 255))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  decoded = decode_image(_encode(image, "PNG", exif=exif), "rotated.png")
  assert decoded.shape == (4, 2, 3)
  assert decoded[0, 1].min() > 200  # the top-left pixel moved to the top-right


def test_unreadable_file_error_names_it(tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not an image at all")
  with pytest.raises(UnreadableImageError, match="broken.png"):
    read_image(str(broken))
  with pytest.raises(UnreadableImageError, match="missing.png"):
    read_image(str(tmp_path / "missing.png"))


def _photo(width: int, height: int) -> Image.Image:
  """Smooth colour fields with fine noise: what a JPEG of a drawing or photo decodes to, roughly."""
  rng = np.random.default_rng(0)
  low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
  noisy = np.asarray(low, np.int16) + rng.integers(-8, 9, (height, width, 3))
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_resize_decodes_a_large_jpeg_at_reduced_scale_close_to_the_full_decode(monkeypatch):
  data = _encode(_photo(1600, 1200), "JPEG", quality=92)
  full = preprocess.resize_shorter_side(decode_image(data, "big.jpg"), 224)
  drafts = []
  original_draft = JpegImagePlugin.JpegImageFile.draft

  def recording_draft(image, mode, size):
    result = original_draft(image, mode, size)
    drafts.append(image.size)  # the size libjpeg will decode at
    return result

  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
  reduced = decode_image(data, "big.jpg", shorter_side=224)
  assert drafts == [(400, 300)]  # 1/4 scale: the largest that keeps the shorter side >= 224
  assert reduced.shape == full.shape == (224, 299, 3)
  difference = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
  assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12


def test_resize_follows_exif_orientation_and_matches_the_full_shape():
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 1200x900, shown 900x1200
  data = _encode(_photo(1200, 900), "JPEG", quality=92, exif=exif)
  full = preprocess.resize_shorter_side(decode_image(data, "rotated.jpg"), 100)
  reduced = decode_image(data, "rotated.jpg", shorter_side=100)
  assert reduced.shape == full.shape == (133, 100, 3)
  assert np.abs(reduced.astype(np.int16) - full.astype(np.int16)).mean() < 3.0  # 1/8 scale, so a little more


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_resize_without_a_reduced_scale_is_bitwise_the_full_decode_then_resize(fmt):
  data = _encode(_photo(300, 260), fmt)  # a JPEG under twice the side: libjpeg decodes it in full
  expected = preprocess.resize_shorter_side(decode_image(data, "small"), 224)
  np.testing.assert_array_equal(decode_image(data, "small", shorter_side=224), expected)


def test_native_decode_never_drafts(monkeypatch):
  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda *_: pytest.fail("drafted a native decode"))
  data = _encode(_photo(800, 600), "JPEG")
  decoded = decode_image(data, "native.jpg")
  assert decoded.shape == (600, 800, 3)
  with Image.open(io.BytesIO(data)) as image:
    np.testing.assert_array_equal(decoded, np.asarray(image.convert("RGB")))
