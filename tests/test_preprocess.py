import numpy as np

from flax_detector import preprocess
from flax_detector.preprocess import AugmentOptions

NO_AUGMENT = AugmentOptions(0.0, 0.0, (90, 90), 0.0, (1.0, 1.0))
ALWAYS = AugmentOptions(1.0, 1.0, (50, 50), 1.0, (1.0, 1.0))


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_crop_keeps_native_pixels_and_pads_small_images():
  image = _image(40, 50)
  crop = preprocess.train_transform(image, 32, "crop", NO_AUGMENT, np.random.default_rng(0))
  assert crop.shape == (32, 32, 3)
  # The crop is a window of the original, not a resampled view.
  windows = [
    (top, left)
    for top in range(9)
    for left in range(19)
    if np.array_equal(image[top : top + 32, left : left + 32], crop)
  ]
  assert len(windows) == 1
  small = preprocess.eval_transform(_image(20, 40), 32, "crop")
  assert small.shape == (1, 32, 32, 3) and not small[0, 20:].any()


def test_resize_mode_scales_the_shorter_side():
  resized = preprocess.eval_transform(_image(64, 128), 32, "resize")
  assert resized.shape == (1, 32, 32, 3)


def test_eval_transform_is_a_centre_crop():
  image = _image(40, 40)
  np.testing.assert_array_equal(preprocess.eval_transform(image, 32, "crop")[0], image[4:36, 4:36])


def test_eval_grid_spreads_crops_over_the_whole_image():
  image = _image(100, 70)
  views = preprocess.eval_transform(image, 32, "crop", grid=3)
  assert views.shape == (9, 32, 32, 3)
  np.testing.assert_array_equal(views[0], image[:32, :32])  # top-left corner
  np.testing.assert_array_equal(views[4], image[34:66, 19:51])  # centre
  np.testing.assert_array_equal(views[8], image[68:, 38:])  # bottom-right corner


def test_train_transform_is_a_function_of_its_rng():
  image = _image(48, 48)
  a = preprocess.train_transform(image, 32, "crop", ALWAYS, np.random.default_rng(7))
  b = preprocess.train_transform(image, 32, "crop", ALWAYS, np.random.default_rng(7))
  c = preprocess.train_transform(image, 32, "crop", ALWAYS, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_augmentations_change_pixels_when_enabled():
  image = _image(32, 32)
  plain = preprocess.train_transform(image, 32, "crop", NO_AUGMENT, np.random.default_rng(0))
  np.testing.assert_array_equal(plain, image)
  flipped = preprocess.train_transform(
    image, 32, "crop", AugmentOptions(1.0, 0.0, (90, 90), 0.0, (1.0, 1.0)), np.random.default_rng(0)
  )
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  degraded = preprocess.train_transform(
    image, 32, "crop", AugmentOptions(0.0, 1.0, (50, 50), 1.0, (1.0, 1.0)), np.random.default_rng(0)
  )
  assert np.abs(degraded.astype(int) - image).mean() > 10
