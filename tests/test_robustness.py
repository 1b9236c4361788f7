import numpy as np
import pytest

from flax_detector import robustness


def _image(height: int = 61, width: int = 90) -> np.ndarray:
  """Gradients plus noise: texture that JPEG, blur and resizing all visibly change."""
  rng = np.random.default_rng(0)
  rows, cols = np.mgrid[:height, :width]
  base = np.stack([rows * 255 / height, cols * 255 / width, (rows + cols) * 127 / (height + width)], -1)
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _change(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(np.abs(a.astype(np.float64) - b)))


def test_names_and_order():
  assert list(robustness.PERTURBATIONS) == [
    "jpeg_q90",
    "jpeg_q75",
    "jpeg_q50",
    "downscale_0.5",
    "downscale_0.25",
    "blur_sigma1",
    "png_to_jpeg_q95",
  ]


@pytest.mark.parametrize("name", list(robustness.PERTURBATIONS))
@pytest.mark.parametrize("original_format", ["PNG", "JPEG"])
def test_shape_dtype_and_determinism(name, original_format):
  image = _image()
  original = image.copy()
  out = robustness.PERTURBATIONS[name](image, original_format)
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
  expected_shape = {"downscale_0.5": (30, 45), "downscale_0.25": (15, 22)}.get(name, image.shape[:2])
  assert out.shape[:2] == expected_shape
  np.testing.assert_array_equal(robustness.PERTURBATIONS[name](image, original_format), out)
  np.testing.assert_array_equal(image, original)  # the input is not modified


def test_lower_jpeg_quality_changes_more():
  image = _image()
  changes = [_change(robustness.PERTURBATIONS[f"jpeg_q{q}"](image, "PNG"), image) for q in (90, 75, 50)]
  assert 0 < changes[0] < changes[1] < changes[2]


def test_blur_changes_pixels_and_lowers_contrast():
  image = _image()
  blurred = robustness.PERTURBATIONS["blur_sigma1"](image, "PNG")
  assert _change(blurred, image) > 5
  assert np.std(np.diff(blurred.astype(np.float64), axis=1)) < np.std(np.diff(image.astype(np.float64), axis=1))


def test_png_to_jpeg_only_touches_png_originals():
  image = _image()
  perturb = robustness.PERTURBATIONS["png_to_jpeg_q95"]
  for original_format in ("JPEG", "WEBP"):
    np.testing.assert_array_equal(perturb(image, original_format), image)
  for original_format in ("PNG", "png"):
    assert _change(perturb(image, original_format), image) > 0


def test_downscale_keeps_at_least_one_pixel():
  assert robustness.PERTURBATIONS["downscale_0.25"](_image(2, 3), "PNG").shape == (1, 1, 3)


def test_rejects_images_that_are_not_uint8_rgb():
  with pytest.raises(ValueError, match="uint8"):
    robustness.PERTURBATIONS["jpeg_q90"](_image().astype(np.float32), "PNG")
  with pytest.raises(ValueError, match="uint8"):
    robustness.PERTURBATIONS["blur_sigma1"](_image()[..., 0], "PNG")
