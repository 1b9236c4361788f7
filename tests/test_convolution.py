"""oneDNN convolutions (flax_detector.onednn via flax_detector.convolution) against XLA's, the whole model
with oneDNN (convolutions and Dense layers) against XLA, and the choice between them (model.library). The
numeric tests need libdnnl (the `onednn-cpu-gomp` wheel, a dependency on x86-64 Linux)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_detector import compute_library, convolution, onednn, onednn_calls
from flax_detector.models import VGG16, init_variables

needs_onednn = pytest.mark.skipif(onednn.why_unavailable() is not None, reason=str(onednn.why_unavailable()))
_NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv, inputs, kernel, padding):
  outputs = conv(inputs, kernel, (1, 1), padding, dimension_numbers=_NHWC)
  return jnp.sum(jnp.sin(outputs)), outputs


def _value_and_gradients(conv, inputs, kernel, padding):
  (_, outputs), gradients = jax.jit(
    jax.value_and_grad(lambda x, w: _loss(conv, x, w, padding), argnums=(0, 1), has_aux=True)
  )(inputs, kernel)
  return outputs, *gradients


def _relative_error(actual, expected):
  return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


@needs_onednn
@pytest.mark.parametrize(
  "batch, side, in_channels, out_channels, kernel_side, padding",
  [
    (4, 16, 3, 8, 3, ((1, 1), (1, 1))),  # VGG16's first layer
    (2, 8, 64, 64, 3, ((1, 1), (1, 1))),  # past YNNPACK's 16-channel threshold
    (3, 9, 5, 7, 3, ((0, 2), (1, 0))),  # odd sizes, uneven padding
    (2, 6, 4, 6, 1, ((0, 0), (0, 0))),  # 1x1
  ],
)
def test_onednn_forward_and_gradients_match_xla_to_float32_rounding(
  batch, side, in_channels, out_channels, kernel_side, padding
):
  keys = jax.random.split(jax.random.key(0), 2)
  inputs = jax.random.normal(keys[0], (batch, side, side + 1, in_channels))
  kernel = 0.2 * jax.random.normal(keys[1], (kernel_side, kernel_side, in_channels, out_channels))
  expected = _value_and_gradients(jax.lax.conv_general_dilated, inputs, kernel, padding)
  actual = _value_and_gradients(convolution.onednn_conv_general_dilated, inputs, kernel, padding)
  for name, got, want in zip(("output", "input gradient", "kernel gradient"), actual, expected, strict=True):
    assert got.shape == want.shape, name
    assert _relative_error(got, want) < 1e-5, name


@needs_onednn
def test_onednn_results_are_bitwise_repeatable():
  shape = onednn.ConvolutionShape(8, 32, 32, 16, 32, 3, 3, ((1, 1), (1, 1)))
  rng = np.random.default_rng(0)
  inputs = rng.standard_normal((8, 32, 32, 16), dtype=np.float32)
  kernel = rng.standard_normal((3, 3, 16, 32), dtype=np.float32)
  output_gradient = rng.standard_normal((8, 32, 32, 32), dtype=np.float32)
  conv = onednn.convolution(shape)

  def all_pieces():
    return (
      conv.forward(inputs, kernel),
      conv.input_gradient(output_gradient, kernel),
      conv.kernel_gradient(inputs, output_gradient),
    )

  first, second = all_pieces(), all_pieces()
  for one, other in zip(first, second, strict=True):
    assert one.tobytes() == other.tobytes()
  assert set(conv.implementations) == {"forward", "input gradient", "kernel gradient"}


@needs_onednn
def test_convolutions_onednn_cannot_do_stay_with_xla():
  """bfloat16, strides, dilations and groups are left to lax.conv_general_dilated: no callback, same bits."""
  inputs = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
  cases = [
    ((inputs.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1)), {}),
    ((inputs, kernel, (2, 2)), {}),
    ((inputs, kernel, (1, 1)), {"rhs_dilation": (2, 2)}),
    ((inputs, kernel[:, :, :2], (1, 1)), {"feature_group_count": 2}),
  ]
  padding = ((1, 1), (1, 1))
  for (x, w, strides), options in cases:

    def ours(x, w, strides=strides, options=options):
      return convolution.onednn_conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, **options)

    def xla(x, w, strides=strides, options=options):
      return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, **options)

    assert "flax_detector_onednn" not in str(jax.make_jaxpr(ours)(x, w))
    np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(xla)(x, w))
  for padding in ("SAME", ((-1, 0), (0, 0))):  # padding by name, negative padding
    conv = functools.partial(convolution.onednn_conv_general_dilated, padding=padding, dimension_numbers=_NHWC)
    assert "flax_detector_onednn" not in str(jax.make_jaxpr(lambda x, w, conv=conv: conv(x, w, (1, 1)))(inputs, kernel))


@needs_onednn
def test_host_flops_counts_the_custom_calls_xla_keeps():
  """host_flops adds what XLA's cost analysis cannot see inside a custom call: here a forward pass and both
  gradients of a first layer minus its input gradient, which nothing reads (so XLA drops that call)."""
  images = jnp.ones((4, 16, 16, 3))
  kernel = jnp.ones((3, 3, 3, 8))

  def loss(kernel):
    conv = convolution.onednn_conv_general_dilated(images, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    return jnp.sum(conv**2)

  shape = onednn.ConvolutionShape(4, 16, 16, 3, 8, 3, 3, ((1, 1), (1, 1)))
  assert shape.flops == 2 * 4 * 16 * 16 * 8 * 3 * 3 * 3
  counted = onednn_calls.host_flops(jax.jit(jax.grad(loss)).trace(kernel).jaxpr.jaxpr)
  assert counted == 2 * shape.flops  # forward + kernel gradient


@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg16_with_onednn_matches_xla_and_repeats_bitwise(onednn_allowed, batch_norm):
  images = jax.random.randint(jax.random.key(2), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  results = {}
  for choice in ("xla", "onednn"):
    model = VGG16(batch_norm=batch_norm, width_multiplier=1 / 16, dropout_rate=0.0, library=choice)
    variables = init_variables(model, 32, jax.random.key(0))

    def loss(params, model=model, variables=variables):
      logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    gradients = jax.jit(jax.grad(loss))(variables["params"])
    evaluate = jax.jit(lambda variables, model=model: model.apply(variables, images, train=False))
    evaluation = evaluate(variables)
    # Evaluation runs each convolution, its bias and its ReLU as one oneDNN primitive.
    fused = "flax_detector_onednn_convolution_bias_relu" in str(evaluate.trace(variables).jaxpr)
    assert fused == (choice == "onednn")
    results[choice] = (gradients, evaluation)
    again = jax.jit(jax.grad(loss))(variables["params"])  # a second run: the same bits
    assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(gradients)))
    assert ("flax_detector_onednn" in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))) == (choice == "onednn")
  # The absolute floor covers the conv biases ahead of a BatchNorm, whose gradient is zero up to rounding.
  for expected, actual in zip(jax.tree.leaves(results["xla"]), jax.tree.leaves(results["onednn"]), strict=True):
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-6 + 2e-4 * float(jnp.max(jnp.abs(expected))))


def test_auto_picks_xla_on_several_devices_and_onednn_says_why_it_cannot_run():
  assert jax.device_count() == 8  # tests/conftest.py
  assert compute_library.uses_onednn("xla") is False
  assert compute_library.uses_onednn("auto") is False
  with pytest.raises(ValueError, match='model.library="onednn" cannot run here: .*8 devices'):
    compute_library.uses_onednn("onednn")
  with pytest.raises(ValueError, match="model.library='cudnn'"):
    compute_library.uses_onednn("cudnn")


def test_a_missing_library_names_what_was_tried_and_how_to_install_it():
  script = "from flax_detector import onednn\nprint(onednn.why_unavailable())"
  env = dict(os.environ, FLAX_DETECTOR_LIBDNNL="/nonexistent/libdnnl.so.3")
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert "/nonexistent/libdnnl.so.3" in done.stdout
  assert "pip install onednn-cpu-gomp==2023.2.0" in done.stdout


def test_fused_bias_relu_matches_xla_with_its_gradients_and_declines_what_it_cannot_take(onednn_allowed):
  keys = jax.random.split(jax.random.key(5), 3)
  x, kernel = jax.random.normal(keys[0], (3, 9, 7, 5)), jax.random.normal(keys[1], (3, 3, 5, 6))
  bias = jax.random.normal(keys[2], (6,))
  padding = ((1, 1), (1, 1))

  def reference(x, kernel, bias):
    return jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC) + bias)

  def fused(x, kernel, bias):
    return convolution.conv_bias_relu("onednn", x, kernel, bias, padding)

  np.testing.assert_allclose(jax.jit(fused)(x, kernel, bias), reference(x, kernel, bias), rtol=1e-5, atol=1e-5)
  assert float(jnp.mean(jax.jit(fused)(x, kernel, bias) == 0)) > 0.2  # the ReLU did cut
  # Differentiable (Grad-CAM differentiates the evaluation model), through the training convolution.
  gradients = jax.grad(lambda *a: jnp.sum(jnp.sin(fused(*a))), argnums=(0, 1, 2))(x, kernel, bias)
  expected = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), argnums=(0, 1, 2))(x, kernel, bias)
  for actual, wanted in zip(gradients, expected, strict=True):
    np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(wanted))))
  # MFU's count sees the fused call's convolution.
  shape = onednn.ConvolutionShape(3, 9, 7, 5, 6, 3, 3, padding)
  assert onednn_calls.host_flops(jax.jit(fused).trace(x, kernel, bias).jaxpr.jaxpr) == shape.flops
  assert convolution.conv_bias_relu("xla", x, kernel, bias, padding) is None
  assert convolution.conv_bias_relu("onednn", x.astype(jnp.bfloat16), kernel, bias, padding) is None
  assert convolution.conv_bias_relu("onednn", x, kernel, bias[:3], padding) is None


_FIRST_USE_FROM_EIGHT_THREADS = """
import threading
from flax_detector import onednn
for attempt in range(20):
  onednn._create_engine_and_stream.cache_clear()  # a fresh first use each attempt (engines leak: a subprocess)
  barrier, handles = threading.Barrier(8), []
  def first_use():
    barrier.wait()
    engine, stream = onednn._engine_and_stream()
    handles.append((engine.value, stream.value))
  threads = [threading.Thread(target=first_use) for _ in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(set(handles)) == 1, f"attempt {attempt}: {len(set(handles))} engines"
print("one engine")
"""


@needs_onednn
def test_threads_using_onednn_at_once_for_the_first_time_share_one_engine():
  """XLA can make its first two oneDNN calls at once; a second engine made oneDNN refuse every later call of
  a primitive built on the other one (dnnl_invalid_arguments). Unguarded, 8 threads made 2 engines in about
  one attempt in three."""
  done = subprocess.run(
    [sys.executable, "-c", _FIRST_USE_FROM_EIGHT_THREADS], capture_output=True, text=True, timeout=300, check=False
  )
  assert done.returncode == 0 and "one engine" in done.stdout, done.stderr[-2000:]
