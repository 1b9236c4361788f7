"""Grad-CAM: the maths on a hand-computable case, the geometry of views, and localisation of a traced patch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import gradcam, inference, preprocess, report, sharding
from flax_detector.data.synthetic import generator_kernel, upsample_transposed
from flax_detector.models import create_model, init_variables, view_averaged_log_probs
from tests.conftest import tiny_config

# A flat colour at ImageNet's mean, so zero padding at the crop borders looks like the background.
BACKGROUND = (124, 116, 104)


def test_grad_cam_weighs_channels_by_their_mean_gradient_and_keeps_the_positive_part():
  features = np.zeros((1, 2, 2, 2), np.float32)
  features[0, :, :, 0] = [[1, 2], [3, 4]]
  features[0, :, :, 1] = [[4, 0], [0, 0]]
  gradients = np.zeros_like(features)
  gradients[0, :, :, 0] = [[1, 1], [1, 1]]  # mean 1
  gradients[0, :, :, 1] = [[-8, 0], [0, 0]]  # mean -2
  expected = np.maximum(0, 1 * features[0, :, :, 0] - 2 * features[0, :, :, 1])  # [[0, 2], [3, 4]]
  np.testing.assert_allclose(gradcam.grad_cam(features, gradients)[0], expected)


def test_positive_log_odds_of_two_classes_is_the_logit_difference():
  logits = jnp.array([[0.3, 2.0], [1.5, -1.0]])
  log_probs = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(gradcam.positive_log_odds(log_probs, 1), logits[:, 1] - logits[:, 0], rtol=1e-6)
  three = jax.nn.log_softmax(jnp.array([[0.1, 0.7, -0.4]]))
  p = np.exp(three[0])
  np.testing.assert_allclose(gradcam.positive_log_odds(three, 1), [np.log(p[1] / (p[0] + p[2]))], rtol=1e-5)


@pytest.mark.parametrize("mode", ["crop", "resize"])
@pytest.mark.parametrize("shape", [(96, 80), (20, 50), (64, 64), (33, 150)])
def test_fitted_shape_is_the_shape_eval_transform_crops_from(mode, shape):
  image = np.zeros(shape + (3,), np.uint8)
  content = preprocess.resize_shorter_side(image, 32) if mode == "resize" else image
  assert gradcam.fitted_shape(*shape, 32, mode) == (
    content.shape[:2],
    preprocess.pad_to_at_least(content, 32).shape[:2],
  )


def test_heatmap_puts_each_views_map_where_its_crop_was_cut():
  size, grid, shape = 32, 3, (96, 80)  # crop offsets 0, 32, 64 down and 0, 24, 48 across
  view_cams = np.arange(1, 10, dtype=np.float32)[:, None, None] * np.ones((9, 2, 2), np.float32)
  heat = gradcam.image_heatmap(view_cams, shape, size, "crop", grid)
  assert heat.shape == shape
  assert heat[0, 0] == 1 and heat[95, 79] == 9 and heat[40, 0] == 4
  assert heat[0, 30] == pytest.approx((1 + 2) / 2)  # columns 24-31 lie in the first two crops of the top row
  small = gradcam.image_heatmap(np.ones((1, 2, 2), np.float32), (20, 25), 32, "crop", 1)
  assert small.shape == (20, 25) and np.all(small == 1)  # the zero padding is cut off again


def test_pixels_between_sparse_crops_have_no_heat_and_stay_untinted():
  heat = gradcam.image_heatmap(np.ones((4, 2, 2), np.float32), (100, 100), 32, "crop", 2)
  assert np.isnan(heat[50, 50]) and heat[0, 0] == 1 and heat[99, 99] == 1
  image = np.full((100, 100, 3), 77, np.uint8)
  blended = gradcam.overlay(image, heat)
  assert np.all(blended[50, 50] == 77) and np.any(blended[0, 0] != 77)
  assert np.array_equal(gradcam.overlay(image, np.zeros((100, 100), np.float32)), image)


def _trace_detector_variables(model, image_size: int) -> dict:
  """VGG16 weights made by hand: logit_ai grows with the image's pixel-to-pixel differences.

  conv 1 takes +-vertical and +-horizontal first differences (their ReLUs sum to |dy| + |dx|, zero on a
  flat colour and high on a generator's periodic trace), conv 2 sums them into channel 0, and every later
  conv passes channel 0 on unchanged, so the last conv stage holds a map of where the trace is. The head
  averages that channel and scales it into logit_ai; logit_human stays 0.
  """
  shapes = jax.eval_shape(lambda: init_variables(model, image_size, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes["params"])
  first = params["Conv_0"]["kernel"]  # [3, 3, rgb, channels]
  first[1, 1, :, :] = [1, -1, 1, -1]
  first[0, 1, :, 0:2] = [-1, 1]
  first[1, 0, :, 2:4] = [-1, 1]
  params["Conv_1"]["kernel"][1, 1, :, 0] = 1
  for layer in range(2, 13):
    params[f"Conv_{layer}"]["kernel"][1, 1, 0, 0] = 1
  dense = params["Dense_0"]["kernel"]
  channels = dense.shape[0] // 49
  dense[0::channels, 0] = 1 / 49
  params["Dense_1"]["kernel"][0, 0] = 1
  params["Dense_2"]["kernel"][0, 1] = 10
  return {"params": jax.tree.map(jnp.asarray, params), "batch_stats": {}}


def _patch_image(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
  """A flat background with one square whose pixels passed through the generator's traced upsampler."""
  image = np.ones(shape + (3,)) * BACKGROUND
  halved = np.ones((side // 2, side // 2, 3)) * BACKGROUND
  image[top : top + side, left : left + side] = upsample_transposed(halved, generator_kernel(0.1))
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trace_detector():
  config = tiny_config(image_size=64, model__batch_norm=False, data__eval_grid=3, eval_batch_size=8)
  model = create_model(config.model, 2)
  variables = _trace_detector_variables(model, config.image_size)
  detector = inference.build_detector(config, variables, 0, report.Calibration(), sharding.create_mesh())
  return detector, model, variables


def test_scores_with_maps_equal_scores_without(trace_detector):
  detector, model, variables = trace_detector
  clean = np.ones((128, 112, 3), np.uint8) * np.array(BACKGROUND, np.uint8)
  views = [detector.views(_patch_image((128, 112), 40, 24, 32)), detector.views(clean)]
  explained, view_cams = detector.explain(views)
  np.testing.assert_allclose(explained, detector.log_probs(views), atol=1e-5)
  reference = jax.jit(lambda images: view_averaged_log_probs(model.apply, variables, images))(np.stack(views))
  np.testing.assert_allclose(explained, reference, atol=1e-5)
  assert view_cams.shape == (2, 9, 4, 4)
  assert view_cams[1].max() < 0.05 * view_cams[0].max()  # the clean image's only "evidence": crop borders


@pytest.mark.parametrize("top, left", [(40, 24), (80, 64), (0, 72)])
def test_the_map_points_at_the_one_traced_patch(trace_detector, top, left):
  detector, _, _ = trace_detector
  side, shape = 32, (128, 112)
  image = _patch_image(shape, top, left, side)
  _, view_cams = detector.explain([detector.views(image)])
  heat = detector.heatmap(view_cams[0], shape)
  inside = np.zeros(shape, bool)
  inside[top : top + side, left : left + side] = True
  ratio = heat[inside].mean() / heat[~inside].mean()
  print(f"patch at ({top}, {left}): mean heat inside / outside = {ratio:.1f}")
  assert ratio > 4
  assert inside[np.unravel_index(np.argmax(heat), shape)]
