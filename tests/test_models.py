import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import models
from flax_detector.models import (
  LAST_CONV_FEATURES,
  VGG16,
  init_variables,
  max_pool_2x2,
  relu,
  view_averaged_log_probs,
)
from flax_detector.pooled_dense import adaptive_avg_pool


def _param_count(model: VGG16, side: int = 224) -> int:
  variables = jax.eval_shape(
    lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, side, side, 3), jnp.uint8), train=False)
  )
  return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("batch_norm, expected", [(False, 134_268_738), (True, 134_277_186)])
def test_parameter_count_matches_torchvision(batch_norm, expected):
  assert _param_count(VGG16(num_classes=2, batch_norm=batch_norm)) == expected


def test_parameter_count_does_not_depend_on_input_size():
  assert _param_count(VGG16(num_classes=2), side=64) == _param_count(VGG16(num_classes=2), side=224)


def test_width_multiplier_scales_convs_and_classifier():
  variables = jax.eval_shape(
    lambda: VGG16(num_classes=3, width_multiplier=0.25).init(
      {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 64, 64, 3), jnp.uint8), train=False
    )
  )
  params = variables["params"]
  assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 16)
  assert params["Conv_12"]["kernel"].shape == (3, 3, 128, 128)
  assert params["Dense_0"]["kernel"].shape == (7 * 7 * 128, 1024)
  assert params["Dense_2"]["kernel"].shape == (1024, 3)


def test_forward_gives_float32_logits_with_bfloat16_compute():
  model = VGG16(num_classes=2, batch_norm=True, width_multiplier=1 / 16, dtype=jnp.bfloat16)
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  # Shapes and dtypes decide what is checked, so the variables are ones of the initialiser's dtypes: drawing
  # them compiles a random initialiser per layer. One jit: the ops one at a time compile one program each.
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images, train=False))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes["params"]))
  variables = jax.tree.map(lambda leaf: jnp.ones(leaf.shape, leaf.dtype), shapes)
  logits, _ = jax.jit(
    lambda variables: model.apply(
      variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["batch_stats"]
    )
  )(variables)
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32


def test_adaptive_avg_pool_follows_torch_bins():
  x = jnp.arange(2 * 14 * 14 * 1, dtype=jnp.float32).reshape(2, 14, 14, 1)
  pooled = adaptive_avg_pool(x, 7)
  expected = x.reshape(2, 7, 2, 7, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(pooled, expected, rtol=1e-6)
  # Smaller than the output (2 -> 7): torch's bins are [0,1) x3, [0,2), [1,2) x3.
  small = jnp.asarray([10.0, 20.0]).reshape(1, 2, 1, 1) * jnp.ones((1, 2, 2, 1))
  rows = adaptive_avg_pool(small, 7)[0, :, 0, 0]
  np.testing.assert_allclose(rows, [10, 10, 10, 15, 20, 20, 20], rtol=1e-6)


def test_view_averaged_log_probs_average_each_images_views():
  per_image_logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0], [0.0, -1.0]])

  def apply_fn(variables, images, train):
    del variables, train
    return per_image_logits[images[:, 0, 0, 0].astype(jnp.int32)]  # pixel value picks a row

  images = jnp.arange(4, dtype=jnp.uint8).reshape(2, 2, 1, 1, 1) * jnp.ones((2, 2, 4, 4, 3), jnp.uint8)
  log_probs = view_averaged_log_probs(apply_fn, None, images)
  views = jax.nn.log_softmax(per_image_logits, axis=-1).reshape(2, 2, 2)
  np.testing.assert_allclose(log_probs, jax.nn.log_softmax(views.mean(axis=1), axis=-1), rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-6)
  single = view_averaged_log_probs(apply_fn, None, images[:, :1])
  np.testing.assert_allclose(single, jax.nn.log_softmax(per_image_logits[jnp.array([0, 2])], axis=-1), rtol=1e-6)


@pytest.mark.parametrize("side", [8, 9])
@pytest.mark.parametrize("values", ["continuous", "with ties"])
def test_max_pool_matches_flax_max_pool_and_its_gradient(side, values):
  """models.max_pool_2x2 (a reshape's max on CPU and GPU, with its own gradient) equals nn.max_pool and its gradient
  exactly: each window's gradient goes to its first maximum, also where a window holds several (after a
  ReLU, zeros; below, values rounded to halves as well)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, 3))
  if values == "with ties":
    x = jnp.round(x * 2) / 2
  cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, side // 2, side // 2, 3))
  flax_pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
  for inputs in (x, jax.nn.relu(x)):
    pooled, pool_gradient = jax.vjp(max_pool_2x2, inputs)
    flax_pooled, flax_gradient = jax.vjp(flax_pool, inputs)
    np.testing.assert_array_equal(pooled, flax_pooled)
    np.testing.assert_array_equal(pool_gradient(cotangent)[0], flax_gradient(cotangent)[0])
  ties = (jax.nn.relu(x)[:, : side // 2 * 2, : side // 2 * 2].reshape(2, side // 2, 2, side // 2, 2, 3) == 0).sum(
    axis=(2, 4)
  )
  assert (ties > 1).any()  # the case where sharing the gradient among maxima would differ


@pytest.mark.parametrize("backend, lowered_for, reduce_window", [("gpu", "cuda", False), ("tpu", "tpu", True)])
def test_max_pool_gradient_per_backend(monkeypatch, backend, lowered_for, reduce_window):
  """Traced as a process on that backend traces it and lowered for it (no device needed): on GPU the pool and
  its gradient are elementwise (XLA:GPU expands nn.max_pool's select-and-scatter into int32 index arrays and a
  scatter); TPUs keep nn.max_pool's reduce-window and select-and-scatter, which XLA:TPU runs as one op each."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  pool_gradient = jax.jit(jax.value_and_grad(lambda x: max_pool_2x2(x).astype(jnp.float32).sum()))
  lowered = pool_gradient.trace(jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.bfloat16)).lower(
    lowering_platforms=(lowered_for,)
  )
  program = lowered.as_text()
  assert ("reduce_window" in program) == reduce_window
  assert ("select_and_scatter" in program) == reduce_window


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_and_its_gradient_are_jax_relus(dtype):
  """models.relu reads its derivative from its output: the same values and gradients as jax.nn.relu, bitwise,
  at zeros of either sign, infinities and the smallest subnormals too."""
  tiny = jnp.finfo(dtype).smallest_subnormal
  x = jnp.concatenate(
    [jax.random.normal(jax.random.PRNGKey(0), (64,)), jnp.array([0.0, -0.0, jnp.inf, -jnp.inf])]
  ).astype(dtype)
  x = jnp.concatenate([x, jnp.array([tiny, -tiny], dtype)])
  cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape).astype(dtype)
  ours, our_gradient = jax.vjp(relu, x)
  theirs, their_gradient = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(our_gradient(cotangent)[0], their_gradient(cotangent)[0])


def test_relu_gradient_masks_with_its_output_not_its_input():
  """The backward pass tests relu(x) != 0, not x > 0, so XLA:GPU can fuse the ReLU into the convolution before it
  (the convolution's output then has one user). A `>` on max(x, 0) would be simplified back into x > 0."""

  def loss(x):
    return relu(x).astype(jnp.float32).sum()

  program = jax.jit(jax.grad(loss)).trace(jax.ShapeDtypeStruct((4, 8), jnp.bfloat16)).lower().as_text()
  comparisons = [line for line in program.splitlines() if "stablehlo.compare" in line]
  assert comparisons and all("NE" in line for line in comparisons)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_evaluation_folds_batch_norm_into_the_convolutions_within_float_rounding(dtype, tolerance):
  """Evaluation computes conv + BatchNorm as one convolution; a training pass with frozen features still
  normalises in two steps with the same running statistics: their outputs agree to float rounding."""
  model = VGG16(batch_norm=True, width_multiplier=1 / 16, dropout_rate=0.0, dtype=dtype)
  variables = init_variables(model, 32, jax.random.PRNGKey(0))
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  # Statistics and affine parameters far from 0 and 1, so that folding them in changes every kernel.
  variables["batch_stats"] = jax.tree.map(
    lambda a: a + jax.random.uniform(next(keys), a.shape, minval=0.2, maxval=1.0), variables["batch_stats"]
  )
  variables["params"] = {
    name: jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), layer)
    if name.startswith("BatchNorm")
    else layer
    for name, layer in variables["params"].items()
  }
  images = jax.random.randint(jax.random.PRNGKey(2), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)

  def last_features_and_logits(module, train):
    logits, state = module.apply(variables, images, train=train, mutable=["intermediates"])
    return state["intermediates"][LAST_CONV_FEATURES][0].astype(jnp.float32), logits

  folded = last_features_and_logits(model, train=False)
  two_step = last_features_and_logits(model.clone(frozen_features=True), train=True)
  scale = float(jnp.max(jnp.abs(two_step[0])))
  assert scale > 0.1  # the features are not all zero: the comparison means something
  np.testing.assert_allclose(folded[0], two_step[0], rtol=tolerance, atol=tolerance * scale)
  np.testing.assert_allclose(folded[1], two_step[1], rtol=tolerance, atol=tolerance * 1e-2)


@pytest.mark.parametrize("library", ["xla", "onednn"])
def test_training_convolutions_leave_out_the_bias_that_batch_norm_cancels(request, monkeypatch, library):
  """A training pass runs each BatchNorm'd conv without its bias add (and with oneDNN, its BatchNorm and ReLU
  in oneDNN): logits, running statistics and every other gradient agree with relu(norm(conv(x))) to float
  rounding, and the bias gets its exact gradient, 0."""
  if library == "onednn":
    request.getfixturevalue("onednn_allowed")
  model = VGG16(batch_norm=True, width_multiplier=1 / 16, dropout_rate=0.0, library=library)
  variables = init_variables(model, 32, jax.random.PRNGKey(0))
  keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(variables))))
  # Biases and running statistics far from their zero initialisation, so that both paths depend on them.
  variables = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(next(keys), a.shape), variables)
  images = jax.random.randint(jax.random.PRNGKey(2), (8, 32, 32, 3), 0, 256).astype(jnp.uint8)

  def loss_and_state(params):
    logits, state = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(logits**2), (logits, state["batch_stats"])

  gradient_of_loss = jax.value_and_grad(loss_and_state, has_aux=True)
  (_, (logits, statistics)), gradients = gradient_of_loss(variables["params"])
  monkeypatch.setattr(models, "batch_normalized_conv_relu", lambda conv, norm, x, library: nn.relu(norm(conv(x))))
  (_, (plain_logits, plain_statistics)), plain_gradients = gradient_of_loss(variables["params"])

  np.testing.assert_allclose(logits, plain_logits, rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), statistics, plain_statistics)
  for name, layer in gradients.items():
    for leaf, gradient in layer.items():
      plain = plain_gradients[name][leaf]
      if name.startswith("Conv") and leaf == "bias":
        np.testing.assert_array_equal(gradient, 0.0)
        # Autodiff of norm(conv(x) + bias) gives rounding noise, orders of magnitude below the kernel's.
        assert np.abs(plain).max() < 1e-4 * np.abs(plain_gradients[name]["kernel"]).max()
      else:
        np.testing.assert_allclose(gradient, plain, rtol=2e-4, atol=2e-4 * np.abs(plain).max())
  moved = jax.tree.map(lambda new, old: np.abs(new - old).max(), statistics, variables["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 1e-3  # the update itself is compared, not two copies of the input
