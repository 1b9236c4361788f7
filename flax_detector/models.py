"""VGG16 in Flax Linen, NHWC, matching torchvision's vgg16 / vgg16_bn topology and initialisation."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_detector import convolution, matmul, normalization
from flax_detector.pooled_dense import PooledDense

# torchvision's configuration "D": conv widths per stage, each stage ends in a 2x2 max pool.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CLASSIFIER_WIDTH = 4096
POOLED_SIDE = 7
# The last conv stage's output (its last ReLU, before the final max pool), exposed for Grad-CAM: sown into
# "intermediates" and passed through `perturb`. Both are no-ops that add no parameters unless a caller makes
# "intermediates" mutable or passes a "perturbations" collection (whose gradient is then this output's).
LAST_CONV_FEATURES = "last_conv_features"

# ImageNet statistics, as torchvision normalises its inputs; images arrive as uint8 and are
# normalised inside the jitted step so only bytes cross the host-device boundary.
_RGB_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
_RGB_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs, N(0, 0.01) for linears, zero biases.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(stddev=0.01)


def scaled_width(width: int, multiplier: float) -> int:
  return max(1, int(round(width * multiplier)))


@jax.custom_jvp
def relu(x: jnp.ndarray) -> jnp.ndarray:
  """max(x, 0), whose derivative is read from its output (where it is nonzero) instead of from x.

  jax.nn.relu's derivative tests x > 0, so the training step keeps x, the convolution's output before the
  ReLU, for the backward pass. XLA:GPU can then not hand the ReLU to cuDNN (its rewrite needs the
  convolution's output to have the ReLU as its only user), and every plain VGG16 layer writes x, reads it
  back and writes relu(x): 3.8 GB of the 37.8 GB per step in the H200 compile at 224 px, bf16, batch 128
  (benchmarks/RESULTS.md, session 19). Read from the output, the mask needs only what the next layer keeps
  anyway. It is `!= 0` because XLA's simplifier rewrites max(x, 0) > 0 back into x > 0. For every x but NaN
  the gradient is jax.nn.relu's exactly (tests/test_models.py); at a NaN, where the loss is NaN anyway, the
  cotangent passes instead of being zeroed.
  """
  return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals: tuple[jnp.ndarray], tangents: tuple[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
  (x,), (tangent,) = primals, tangents
  activation = jnp.maximum(x, 0)
  return activation, jnp.where(activation != 0, tangent, jnp.zeros_like(tangent))


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """nn.max_pool(x, (2, 2), strides=(2, 2)) on NHWC; on CPU and GPU computed as a max over a reshape.

  XLA's CPU and CUDA backends expand nn.max_pool's gradient (a select-and-scatter) into a variadic
  reduce-window, which saves four int32 index arrays of the pooled shape, and a scatter-add into a zeroed
  copy of the input: on CPU about a third of the cpu preset's train step; in the CUDA compile of VGG16-BN
  at 224 px, bf16, batch 128, about 25 GB of the step's 80 GB of memory traffic (benchmarks/RESULTS.md,
  session 18). The reshape's max, with the gradient of `_window_max` below, is elementwise both ways and
  saves one int8 position code per window. Forward and gradient are nn.max_pool's for finite inputs, ties
  included (tests/test_models.py). TPUs keep nn.max_pool: XLA:TPU runs select-and-scatter as one op, and
  its cost analysis puts the reshape's max at 9% more bytes for the whole step.
  """
  if jax.default_backend() == "tpu":
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  height, width = x.shape[1:3]
  return _window_max(x[:, : height // 2 * 2, : width // 2 * 2])  # VALID pooling drops an odd last row or column


def _windows(x: jnp.ndarray) -> jnp.ndarray:
  """[b, h, w, c] as [b, h/2, 2, w/2, 2, c]: each 2x2 window on axes 2 and 4 (a bitcast, no copy)."""
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels)


@jax.custom_vjp
def _window_max(x: jnp.ndarray) -> jnp.ndarray:
  return _windows(x).max(axis=(2, 4))


def _window_max_forward(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The pooled maxima, and for the gradient each window's first maximum as a position code (int8, 0-3).

  The code is a sixteenth of x's bytes (float32), the only residual the gradient needs: x itself need not
  stay alive for it.
  """
  windows = _windows(x)
  pooled = windows.max(axis=(2, 4))
  # Row-major order, as nn.max_pool's gradient picks among equal maxima. A window holding a NaN gets code 3,
  # where nn.max_pool's goes to another single position (a non-finite loss stops training anyway).
  first_maximum = jnp.where(
    windows[:, :, 0, :, 0] == pooled,
    0,
    jnp.where(windows[:, :, 0, :, 1] == pooled, 1, jnp.where(windows[:, :, 1, :, 0] == pooled, 2, 3)),
  ).astype(jnp.int8)
  return pooled, first_maximum


def _window_max_backward(first_maximum: jnp.ndarray, cotangent: jnp.ndarray) -> tuple[jnp.ndarray]:
  """Each window's gradient goes to its first maximum in row-major order, as nn.max_pool's does.

  Autodiff of the reshape's max would share it among equal maxima instead: that needs a count of the
  maxima per window, a reduction XLA runs as a pass of its own over every pooled activation. This is one
  elementwise select over x's shape that reads only the position codes and the cotangent (both pooled-sized);
  writing the four positions' gradients as stacked slices instead took 1.7-2x as long on the cpu preset's
  pools from 32 px down (benchmarks/RESULTS.md, session 16).
  """
  batch, rows, columns, channels = cotangent.shape
  windows_shape = (batch, rows, 2, columns, 2, channels)
  position = 2 * jax.lax.broadcasted_iota(jnp.int8, windows_shape, 2) + jax.lax.broadcasted_iota(
    jnp.int8, windows_shape, 4
  )
  taken = position == first_maximum[:, :, None, :, None, :]
  gradient = jnp.where(taken, cotangent[:, :, None, :, None, :], jnp.zeros((), cotangent.dtype))
  return (gradient.reshape(batch, 2 * rows, 2 * columns, channels),)  # x's shape: max_pool_2x2 cropped it even


_window_max.defvjp(_window_max_forward, _window_max_backward)


def conv_relu_for_evaluation(conv: nn.Conv, norm: nn.BatchNorm | None, x: jnp.ndarray, library: str) -> jnp.ndarray:
  """relu(norm(conv(x))) (relu(conv(x)) without BatchNorm) for evaluation and prediction, in one convolution.

  A BatchNorm on its running statistics is folded into the kernel and bias (kernel * s, (bias - mean) * s +
  beta with s = gamma / sqrt(var + eps)): equal in real arithmetic, within float rounding in practice
  (tested), and one pass less over every activation: the cpu preset's eval forward about 20% faster on CPU
  (benchmarks/RESULTS.md). Where oneDNN computes the model, the bias and the ReLU are applied inside its
  convolution too (flax_detector.convolution.conv_bias_relu), one more pass less. `conv` and `norm` keep
  their own parameters, so checkpoints and weight imports do not change.
  """
  params = conv.variables["params"]
  kernel, bias = params["kernel"], params["bias"]
  if norm is not None:
    statistics = norm.variables["batch_stats"]
    scale = norm.variables["params"]["scale"] * jax.lax.rsqrt(statistics["var"] + norm.epsilon)
    kernel, bias = kernel * scale, (bias - statistics["mean"]) * scale + norm.variables["params"]["bias"]
  if isinstance(conv.padding, int):
    fused = convolution.conv_bias_relu(library, x, kernel, bias, [(conv.padding, conv.padding)] * 2)
    if fused is not None:
      return fused
  if norm is None:
    return relu(conv(x))
  # The same convolution (padding, layout, dtype) as `conv`, only with the folded parameters.
  return relu(conv.clone(parent=None).apply({"params": {"kernel": kernel, "bias": bias}}, x))


def batch_normalized_conv_relu(conv: nn.Conv, norm: nn.BatchNorm, x: jnp.ndarray, library: str) -> jnp.ndarray:
  """relu(norm(conv(x))) where `norm` normalises with the batch's statistics, computed without the conv's bias add.

  A per-channel bias before BatchNorm cancels against the batch mean: the normalised output does not depend on
  it, and its gradient is exactly 0 in real arithmetic (in float, rounding noise). So the convolution runs
  without it, which saves a pass over every activation forward and a reduction over every output gradient
  backward, and the bias gets the exact gradient, 0. The only place the bias shows is the running mean, the
  mean of conv(x) + bias: it is added to the batch mean's share of the update here, so the running
  statistics, and evaluation's folded convolutions, are those of the model as written (tests/test_models.py).
  The BatchNorm and the ReLU are one function with a written-out backward pass (flax_detector.normalization:
  oneDNN's primitives where oneDNN computes the model, XLA otherwise), named as `norm` in profiles and HLO.
  `conv` and `norm` keep their parameters, so checkpoints and torchvision weights do not change.
  """
  kernel, bias = conv.variables["params"]["kernel"], conv.variables["params"]["bias"]
  unbiased = conv.clone(parent=None, use_bias=False).apply({"params": {"kernel": kernel}}, x)
  scale, shift = norm.variables["params"]["scale"], norm.variables["params"]["bias"]
  with jax.named_scope(norm.name):
    activations, mean, variance = normalization.batch_norm_relu(library, unbiased, scale, shift, norm.epsilon)
  running_variance = norm.get_variable("batch_stats", "var")
  norm.put_variable("batch_stats", "var", norm.momentum * running_variance + (1.0 - norm.momentum) * variance)
  running_mean = norm.momentum * norm.get_variable("batch_stats", "mean") + (1.0 - norm.momentum) * mean
  norm.put_variable("batch_stats", "mean", running_mean + (1.0 - norm.momentum) * bias)
  return activations


class VGG16(nn.Module):
  """VGG16 classifier over uint8 NHWC images; returns float32 logits.

  With width_multiplier=1.0 and 2 classes it has torchvision's parameter count: 134,268,738
  (134,277,186 with BatchNorm).
  """

  num_classes: int = 2
  batch_norm: bool = False
  width_multiplier: float = 1.0
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  stages: Sequence[Sequence[int]] = VGG16_STAGES
  # Fine-tuning with config.freeze="features": the convolutional part is a fixed function of the image
  # (BatchNorm on its running statistics, no gradient) and only the classifier learns. Parameters and
  # numerics are unchanged when False.
  frozen_features: bool = False
  # Which library computes the convolutions and Dense layers: "auto", "xla" or "onednn"
  # (flax_detector.compute_library). Not a parameter: checkpoints are the same whichever computes them.
  library: str = "xla"

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = ((images.astype(jnp.float32) - _RGB_MEAN) / _RGB_STD).astype(self.dtype)
    conv_general_dilated = convolution.conv_general_dilated_for(self.library)
    dot_general = matmul.dot_general_for(self.library)
    for index, stage in enumerate(self.stages):
      for width in stage:
        conv = nn.Conv(
          scaled_width(width, self.width_multiplier),
          (3, 3),
          padding=1,
          kernel_init=_conv_init,
          dtype=self.dtype,
          conv_general_dilated=conv_general_dilated,
        )
        # torch momentum 0.1 is Flax momentum 0.9. Under jit over a sharded batch the statistics are computed
        # over the global batch. Evaluation folds the running statistics into the conv.
        norm = None
        if self.batch_norm:
          norm = nn.BatchNorm(
            use_running_average=not train or self.frozen_features, momentum=0.9, epsilon=1e-5, dtype=self.dtype
          )
        if not train and not self.is_initializing():
          x = conv_relu_for_evaluation(conv, norm, x, self.library)
        elif norm is None:
          x = relu(conv(x))
        elif self.is_initializing() or norm.use_running_average:
          x = relu(norm(conv(x)))
        else:
          x = batch_normalized_conv_relu(conv, norm, x, self.library)
      if index == len(self.stages) - 1:
        self.sow("intermediates", LAST_CONV_FEATURES, x)
        x = self.perturb(LAST_CONV_FEATURES, x)
      x = max_pool_2x2(x)
    if self.frozen_features:
      x = jax.lax.stop_gradient(x)
    hidden = scaled_width(CLASSIFIER_WIDTH, self.width_multiplier)
    # torchvision's avgpool, flatten and first Linear in one, named as the nn.Dense it stands for.
    x = PooledDense(hidden, POOLED_SIDE, _dense_init, dtype=self.dtype, dot_general=dot_general, name="Dense_0")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(relu(x))
    x = nn.Dense(hidden, kernel_init=_dense_init, dtype=self.dtype, dot_general=dot_general, name="Dense_1")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(relu(x))
    logits = nn.Dense(
      self.num_classes, kernel_init=_dense_init, dtype=self.dtype, dot_general=dot_general, name="Dense_2"
    )(x)
    return logits.astype(jnp.float32)


def create_model(model_config: Any, num_classes: int, *, frozen_features: bool = False) -> VGG16:
  """Builds the VGG16 a config's `model` block describes."""
  return VGG16(
    num_classes=num_classes,
    batch_norm=model_config.batch_norm,
    width_multiplier=model_config.width_multiplier,
    dropout_rate=model_config.dropout_rate,
    dtype=jnp.dtype(model_config.dtype),
    frozen_features=frozen_features,
    # Configs saved before the setting existed (an older run's workdir) get the default.
    library=model_config.get("library", "auto"),
  )


def init_variables(model: nn.Module, image_size: int, key: jax.Array) -> dict[str, Any]:
  """{"params", "batch_stats"} of a freshly initialised model (under jax.eval_shape, their shapes).

  The parameter shapes do not depend on image_size (adaptive pooling); the dummy input only has to pass.
  """
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  variables = model.init({"params": key}, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def view_averaged_log_probs(apply_fn: Any, variables: Any, images: jnp.ndarray) -> jnp.ndarray:
  """Class log-probabilities of uint8[b, views, S, S, 3]: the views' log-probabilities averaged.

  Averaging log-probabilities (a geometric mean of the views' probabilities, renormalised) lets a
  view that clearly shows a generator's trace outweigh views of flat colour that show nothing.
  """
  batch, views = images.shape[:2]
  logits = apply_fn(variables, images.reshape((batch * views,) + images.shape[2:]), train=False)
  return average_view_log_probs(logits.reshape(batch, views, -1))


def average_view_log_probs(logits: jnp.ndarray) -> jnp.ndarray:
  """float32[b, views, classes] logits to the images' log-probabilities, as view_averaged_log_probs explains."""
  return jax.nn.log_softmax(jax.nn.log_softmax(logits, axis=-1).mean(axis=1), axis=-1)
