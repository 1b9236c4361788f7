"""oneDNN's convolutions and matmuls on host arrays, called through its C API with ctypes.

Why: on x86 CPUs XLA (jaxlib 0.10.2) runs VGG16's 3x3 convolutions 2-3x slower than oneDNN, the library
PyTorch uses (benchmarks/RESULTS.md, `benchmarks/conv_kernels.py`), and its own oneDNN rewriter does not
claim them; its products for the first Dense layer are up to 2x slower too. `flax_detector.convolution` and
`flax_detector.matmul` call these kernels from the jitted step on CPU, as XLA custom calls on XLA's own
buffers (flax_detector.onednn_calls; `Convolution.run` and `Matmul.run` take their addresses).

The library comes from the `onednn-cpu-gomp` wheel (a dependency on x86-64 Linux), which installs
`libdnnl.so.3` (oneDNN 3.x, GNU OpenMP threads) into the environment's `lib/`. Nothing is compiled: the
functions used here are oneDNN's stable v3 C API. Format tags are looked up by name at load time; the other
enum values below are fixed by that API (include/oneapi/dnnl/dnnl_types.h).

Convolutions: activations are NHWC and kernels HWIO, as in Flax, float32 only. Each primitive lets oneDNN choose the
kernel layout it runs fastest with (format "any"), and reorders the HWIO kernel into it and the kernel
gradient back out of it; for the small kernels of VGG16 that reorder costs microseconds, while a kernel
pinned to HWIO sends the gradients to a slower im2col + GEMM path (3x slower on the cpu preset).
"""

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from absl import logging

LIBRARY_NAME = "libdnnl.so.3"
_Handle = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12  # dnnl_dims_t: DNNL_MAX_NDIMS int64 values

_CPU_ENGINE = 1  # dnnl_cpu
_STREAM_DEFAULT_FLAGS = 1  # dnnl_stream_in_order
_FLOAT32 = 3  # dnnl_f32
_FORWARD_TRAINING = 64  # dnnl_forward_training
_FORWARD_INFERENCE = 96  # dnnl_forward_inference
_ELTWISE_RELU = 0x20  # dnnl_eltwise_relu
_CONVOLUTION_DIRECT = 1  # dnnl_convolution_direct
_QUERY_IMPLEMENTATION = 8  # dnnl_query_impl_info_str
_QUERY_WEIGHTS = 131  # dnnl_query_weights_md
_QUERY_DIFF_WEIGHTS = 132  # dnnl_query_diff_weights_md
_BACKWARD = 128  # dnnl_backward
_SCALE_SHIFT_AND_RELU = 0x2 | 0x4 | 0x8  # dnnl_use_scale | dnnl_use_shift | dnnl_fuse_norm_relu
_QUERY_WORKSPACE = 135  # dnnl_query_workspace_md
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS = 1, 17, 33, 41
_ARG_MEAN, _ARG_VARIANCE, _ARG_SCALE, _ARG_SHIFT, _ARG_WORKSPACE = 49, 50, 51, 52, 64
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_ARG_DIFF_SCALE, _ARG_DIFF_SHIFT = 255, 256


class OneDnnUnavailable(RuntimeError):
  """libdnnl could not be loaded; the message says what was tried and how to install it."""


class _ExecArgument(ctypes.Structure):
  _fields_ = [("arg", ctypes.c_int), ("memory", _Handle)]


def _library_candidates() -> list[str]:
  explicit = os.environ.get("FLAX_DETECTOR_LIBDNNL")
  if explicit:
    return [explicit]
  return [os.path.join(sys.prefix, "lib", LIBRARY_NAME), LIBRARY_NAME]


@functools.cache
def _library() -> ctypes.CDLL:
  errors = []
  for candidate in _library_candidates():
    try:
      library = ctypes.CDLL(candidate)
      break
    except OSError as error:
      errors.append(f"{candidate}: {error}")
  else:
    raise OneDnnUnavailable(
      "oneDNN (libdnnl.so.3) did not load: " + "; ".join(errors) + ". Install it with "
      "`pip install onednn-cpu-gomp==2023.2.0` (x86-64 Linux; it needs libgomp.so.1, GCC's OpenMP runtime), "
      'point FLAX_DETECTOR_LIBDNNL at a libdnnl.so.3, or set model.library = "xla".'
    )
  library.dnnl_fmt_tag2str.restype = ctypes.c_char_p
  library.dnnl_primitive_desc_query_md.restype = _Handle
  library.dnnl_primitive_desc_query_md.argtypes = [_Handle, ctypes.c_int, ctypes.c_int]
  library.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
  library.dnnl_memory_desc_get_size.argtypes = [_Handle]
  return library


def why_unavailable() -> str | None:
  """What stops libdnnl from loading (what was tried, how to install it), or None when it loads."""
  try:
    _library()
  except OneDnnUnavailable as error:
    return str(error)
  return None


def _check(status: int, call: str) -> None:
  if status != 0:
    raise RuntimeError(f"oneDNN {call} failed with dnnl_status_t {status}")


@functools.cache
def _format_tags() -> dict[str, int]:
  """Format tag values by their oneDNN names (e.g. "acdb" is NHWC), read from the library itself."""
  library = _library()
  names = {value: library.dnnl_fmt_tag2str(value) for value in range(1024)}
  return {name.decode(): value for value, name in names.items() if name}


_ENGINE_CREATION_LOCK = threading.Lock()


def _engine_and_stream() -> tuple[_Handle, _Handle]:
  """The process's one CPU engine and stream. XLA can make its first two oneDNN calls at once (the first
  convolution beside the fold of the first Dense layer's kernel): unguarded, each thread made an engine of
  its own, and a primitive then ran on another engine's stream or memory, which oneDNN refuses with
  dnnl_invalid_arguments (status 2) on every later call."""
  with _ENGINE_CREATION_LOCK:
    return _create_engine_and_stream()


@functools.cache
def _create_engine_and_stream() -> tuple[_Handle, _Handle]:
  library = _library()
  engine, stream = _Handle(), _Handle()
  _check(library.dnnl_engine_create(ctypes.byref(engine), _CPU_ENGINE, 0), "dnnl_engine_create")
  _check(library.dnnl_stream_create(ctypes.byref(stream), engine, _STREAM_DEFAULT_FLAGS), "dnnl_stream_create")
  return engine, stream


def _memory_descriptor(dims: tuple[int, ...], tag: str) -> _Handle:
  descriptor = _Handle()
  _check(
    _library().dnnl_memory_desc_create_with_tag(
      ctypes.byref(descriptor), len(dims), _Dims(*dims), _FLOAT32, _format_tags()[tag]
    ),
    "dnnl_memory_desc_create_with_tag",
  )
  return descriptor


def _primitive(descriptor: _Handle) -> _Handle:
  primitive = _Handle()
  _check(_library().dnnl_primitive_create(ctypes.byref(primitive), descriptor), "dnnl_primitive_create")
  return primitive


def _reorder(source: _Handle, destination: _Handle) -> _Handle:
  engine, _ = _engine_and_stream()
  descriptor = _Handle()
  _check(
    _library().dnnl_reorder_primitive_desc_create(ctypes.byref(descriptor), source, engine, destination, engine, None),
    "dnnl_reorder_primitive_desc_create",
  )
  return _primitive(descriptor)


def _implementation(descriptor: _Handle) -> str:
  name = ctypes.c_char_p()
  _check(
    _library().dnnl_primitive_desc_query(descriptor, _QUERY_IMPLEMENTATION, 0, ctypes.byref(name)),
    "dnnl_primitive_desc_query",
  )
  return name.value.decode()


@dataclass(frozen=True)
class ConvolutionShape:
  """A stride-1, undilated, ungrouped 2D convolution: NHWC input, HWIO kernel, NHWC output."""

  batch: int
  height: int
  width: int
  in_channels: int
  out_channels: int
  kernel_height: int
  kernel_width: int
  padding: tuple[tuple[int, int], tuple[int, int]]

  @property
  def output_height(self) -> int:
    return self.height + sum(self.padding[0]) - self.kernel_height + 1

  @property
  def output_width(self) -> int:
    return self.width + sum(self.padding[1]) - self.kernel_width + 1

  @property
  def geometry(self) -> np.ndarray:
    """The shape as 11 int64s, the form an XLA custom call carries it in (see `from_geometry`)."""
    (top, bottom), (left, right) = self.padding
    sizes = (self.batch, self.height, self.width, self.in_channels, self.out_channels)
    return np.array([*sizes, self.kernel_height, self.kernel_width, top, bottom, left, right], np.int64)

  @classmethod
  def from_geometry(cls, geometry: Sequence[int]) -> "ConvolutionShape":
    values = [int(value) for value in geometry]
    return cls(*values[:7], ((values[7], values[8]), (values[9], values[10])))

  def result_shape(self, piece: str) -> tuple[int, int, int, int]:
    """The shape of what `piece` ("forward", "input_gradient" or "kernel_gradient") computes."""
    return {
      "forward": (self.batch, self.output_height, self.output_width, self.out_channels),
      "input_gradient": (self.batch, self.height, self.width, self.in_channels),
      "kernel_gradient": (self.kernel_height, self.kernel_width, self.in_channels, self.out_channels),
    }[piece]

  @property
  def flops(self) -> int:
    """Multiplies and adds of one piece (forward, input or kernel gradient: each the same product)."""
    taps = self.kernel_height * self.kernel_width * self.in_channels
    return 2 * self.batch * self.output_height * self.output_width * self.out_channels * taps


# oneDNN runs each primitive on all cores (OpenMP); two at once from XLA's threads would only contend. The lock
# also makes each call's memory objects its own from re-pointing them until the primitive has finished.
_EXECUTION_LOCK = threading.Lock()
# The profiler event a call records once it holds the lock: a custom call's own trace event also covers its
# wait for the lock, while another call runs (flax_detector.step_profile starts the op here instead).
RUNNING_EVENT = "oneDNN primitive running"
_ALLOCATE = _Handle(ctypes.c_size_t(-1).value)  # DNNL_MEMORY_ALLOCATE: oneDNN allocates the buffer itself


def _memory(descriptor: _Handle, address: _Handle | None = None) -> _Handle:
  """A oneDNN memory object over `address` (None: no buffer yet; _ALLOCATE: one of its own), kept for the process."""
  memory = _Handle()
  engine, _ = _engine_and_stream()
  _check(_library().dnnl_memory_create(ctypes.byref(memory), descriptor, engine, address), "dnnl_memory_create")
  return memory


def _packed(arguments: dict[int, _Handle]) -> ctypes.Array:
  return (_ExecArgument * len(arguments))(*(_ExecArgument(key, memory) for key, memory in arguments.items()))


class _Call:
  """One primitive, ready to run on the buffers of each call: its memory objects are made once and pointed at
  the call's addresses, so a call costs a few pointer updates rather than four objects made and destroyed.

  `arguments` are the (argument, descriptor) pairs whose buffers the caller passes, in the order `__call__`
  takes their addresses. With `staged_kernel` = (argument, user descriptor) that argument, the weights or
  their gradient, lives in a buffer of the layout the primitive chose (format "any"), allocated once; the
  caller's kernel in the user layout (HWIO) comes last in the addresses and is reordered into that buffer
  before the primitive or, for the gradient, out of it after.
  """

  def __init__(
    self,
    descriptor: _Handle,
    arguments: tuple[tuple[int, _Handle], ...],
    staged_kernel: tuple[int, _Handle] | None = None,
  ):
    library = _library()
    _, self._stream = _engine_and_stream()
    self.implementation = _implementation(descriptor)
    self._primitive = _primitive(descriptor)
    self._external = [_memory(argument_descriptor) for _, argument_descriptor in arguments]
    primitive_arguments = {argument: memory for (argument, _), memory in zip(arguments, self._external, strict=True)}
    before, after = [], []
    if staged_kernel is not None:
      kernel_argument, user_descriptor = staged_kernel
      query = _QUERY_DIFF_WEIGHTS if kernel_argument == _ARG_DIFF_WEIGHTS else _QUERY_WEIGHTS
      staged_descriptor = _Handle(library.dnnl_primitive_desc_query_md(descriptor, query, 0))
      staged, user = _memory(staged_descriptor, _ALLOCATE), _memory(user_descriptor)
      self._external.append(user)
      primitive_arguments[kernel_argument] = staged
      if kernel_argument == _ARG_DIFF_WEIGHTS:
        after.append((_reorder(staged_descriptor, user_descriptor), _packed({_ARG_SRC: staged, _ARG_DST: user})))
      else:
        before.append((_reorder(user_descriptor, staged_descriptor), _packed({_ARG_SRC: user, _ARG_DST: staged})))
    self._sequence = [*before, (self._primitive, _packed(primitive_arguments)), *after]

  def __call__(self, *addresses: int) -> None:
    """Runs the primitive (with its kernel reorder) on the buffers at `addresses` and waits until it has finished."""
    library, stream = _library(), self._stream
    with _EXECUTION_LOCK, jax.profiler.TraceAnnotation(RUNNING_EVENT):
      for memory, address in zip(self._external, addresses, strict=True):
        _check(library.dnnl_memory_set_data_handle(memory, _Handle(address)), "dnnl_memory_set_data_handle")
      for primitive, packed in self._sequence:
        _check(library.dnnl_primitive_execute(primitive, stream, len(packed), packed), "dnnl_primitive_execute")
      _check(library.dnnl_stream_wait(stream), "dnnl_stream_wait")


class _Pieces:
  """The three pieces of an operation on numpy arrays, for tests and benchmarks; the trainer calls `run`
  on XLA's buffers (flax_detector.onednn_calls)."""

  shape: "ConvolutionShape | MatmulShape"

  def run(self, piece: str, first: int, second: int, result: int) -> None:
    raise NotImplementedError

  def forward(self, inputs: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return self._on_arrays("forward", inputs, kernel)

  def input_gradient(self, output_gradient: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return self._on_arrays("input_gradient", output_gradient, kernel)

  def kernel_gradient(self, inputs: np.ndarray, output_gradient: np.ndarray) -> np.ndarray:
    return self._on_arrays("kernel_gradient", inputs, output_gradient)

  def _on_arrays(self, piece: str, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first, second = _float32(first), _float32(second)
    result = np.empty(self.shape.result_shape(piece), np.float32)
    self.run(piece, first.ctypes.data, second.ctypes.data, result.ctypes.data)
    return result


class Convolution(_Pieces):
  """The three oneDNN primitives of one convolution shape, created once and run on numpy arrays."""

  def __init__(self, shape: ConvolutionShape):
    library = _library()
    engine, _ = _engine_and_stream()
    self.shape = shape
    s = shape
    self._input = _memory_descriptor((s.batch, s.in_channels, s.height, s.width), "acdb")
    self._output = _memory_descriptor((s.batch, s.out_channels, s.output_height, s.output_width), "acdb")
    kernel_dims = (s.out_channels, s.in_channels, s.kernel_height, s.kernel_width)
    self._user_kernel = _memory_descriptor(kernel_dims, "cdba")  # HWIO
    self._bias = _memory_descriptor((s.out_channels,), "a")
    self._any_kernel = any_kernel = _memory_descriptor(kernel_dims, "any")
    strides, dilations = _Dims(1, 1), _Dims(0, 0)
    padding_low = _Dims(s.padding[0][0], s.padding[1][0])
    padding_high = _Dims(s.padding[0][1], s.padding[1][1])
    self._geometry = geometry = (strides, dilations, padding_low, padding_high)

    forward = _Handle()
    _check(
      library.dnnl_convolution_forward_primitive_desc_create(
        ctypes.byref(forward),
        engine,
        _FORWARD_TRAINING,
        _CONVOLUTION_DIRECT,
        self._input,
        any_kernel,
        None,
        self._output,
        *geometry,
        None,
      ),
      "dnnl_convolution_forward_primitive_desc_create",
    )
    input_gradient, kernel_gradient = _Handle(), _Handle()
    _check(
      library.dnnl_convolution_backward_data_primitive_desc_create(
        ctypes.byref(input_gradient),
        engine,
        _CONVOLUTION_DIRECT,
        self._input,
        any_kernel,
        self._output,
        *geometry,
        forward,
        None,
      ),
      "dnnl_convolution_backward_data_primitive_desc_create",
    )
    _check(
      library.dnnl_convolution_backward_weights_primitive_desc_create(
        ctypes.byref(kernel_gradient),
        engine,
        _CONVOLUTION_DIRECT,
        self._input,
        any_kernel,
        None,
        self._output,
        *geometry,
        forward,
        None,
      ),
      "dnnl_convolution_backward_weights_primitive_desc_create",
    )
    inputs, outputs = self._input, self._output
    self._calls = {
      "forward": _Call(forward, ((_ARG_SRC, inputs), (_ARG_DST, outputs)), (_ARG_WEIGHTS, self._user_kernel)),
      "input_gradient": _Call(
        input_gradient, ((_ARG_DIFF_DST, outputs), (_ARG_DIFF_SRC, inputs)), (_ARG_WEIGHTS, self._user_kernel)
      ),
      "kernel_gradient": _Call(
        kernel_gradient, ((_ARG_SRC, inputs), (_ARG_DIFF_DST, outputs)), (_ARG_DIFF_WEIGHTS, self._user_kernel)
      ),
    }

  @property
  def implementations(self) -> dict[str, str]:
    """oneDNN's name for the kernel each piece runs (e.g. brgconv:avx512_core), logged by `convolution`."""
    return {piece.replace("_", " "): call.implementation for piece, call in self._calls.items()}

  def run(self, piece: str, first: int, second: int, result: int) -> None:
    """Computes `piece` from the float32, C-order arrays at addresses `first` and `second` into `result`:
    forward (inputs, kernel) -> outputs; input_gradient (output gradient, kernel) -> input gradient;
    kernel_gradient (inputs, output gradient) -> kernel gradient. The kernel is reordered into the layout
    the primitive runs with before it (or, for its gradient, out of it after)."""
    if piece not in self._calls:
      raise ValueError(f"unknown convolution piece {piece!r}")
    # The kernel's address comes last: the second operand, or for the kernel gradient the result.
    if piece == "kernel_gradient":
      self._calls[piece](first, second, result)
    else:
      self._calls[piece](first, result, second)

  def run_with_bias_and_relu(self, inputs: int, kernel: int, bias: int, result: int) -> None:
    """relu(forward(inputs, kernel) + bias) as one inference primitive, which adds the float32[out_channels]
    bias and applies the ReLU as it writes the output: for evaluation and prediction, one pass over each
    activation less than a convolution followed by XLA's bias and ReLU."""
    self._forward_with_bias_and_relu(inputs, bias, result, kernel)

  @functools.cached_property
  def _forward_with_bias_and_relu(self) -> _Call:
    library = _library()
    engine, _ = _engine_and_stream()
    post_ops, attributes, descriptor = _Handle(), _Handle(), _Handle()
    _check(library.dnnl_post_ops_create(ctypes.byref(post_ops)), "dnnl_post_ops_create")
    try:
      _check(
        library.dnnl_post_ops_append_eltwise(post_ops, _ELTWISE_RELU, ctypes.c_float(0.0), ctypes.c_float(0.0)),
        "dnnl_post_ops_append_eltwise",
      )
      _check(library.dnnl_primitive_attr_create(ctypes.byref(attributes)), "dnnl_primitive_attr_create")
      _check(library.dnnl_primitive_attr_set_post_ops(attributes, post_ops), "dnnl_primitive_attr_set_post_ops")
      _check(
        library.dnnl_convolution_forward_primitive_desc_create(
          ctypes.byref(descriptor),
          engine,
          _FORWARD_INFERENCE,
          _CONVOLUTION_DIRECT,
          self._input,
          self._any_kernel,
          self._bias,
          self._output,
          *self._geometry,
          attributes,
        ),
        "dnnl_convolution_forward_primitive_desc_create",
      )
    finally:
      library.dnnl_post_ops_destroy(post_ops)
      if attributes:
        library.dnnl_primitive_attr_destroy(attributes)
    arguments = ((_ARG_SRC, self._input), (_ARG_BIAS, self._bias), (_ARG_DST, self._output))
    return _Call(descriptor, arguments, (_ARG_WEIGHTS, self._user_kernel))


@dataclass(frozen=True)
class MatmulShape:
  """(rows x depth) @ (depth x columns), row-major: a Dense layer's batch, input and output features."""

  rows: int
  depth: int
  columns: int

  @property
  def geometry(self) -> np.ndarray:
    """The shape as 3 int64s, the form an XLA custom call carries it in (see `from_geometry`)."""
    return np.array([self.rows, self.depth, self.columns], np.int64)

  @classmethod
  def from_geometry(cls, geometry: Sequence[int]) -> "MatmulShape":
    return cls(*(int(value) for value in geometry))

  def result_shape(self, piece: str) -> tuple[int, int]:
    """The shape of what `piece` ("forward", "input_gradient" or "kernel_gradient") computes."""
    return {
      "forward": (self.rows, self.columns),
      "input_gradient": (self.rows, self.depth),
      "kernel_gradient": (self.depth, self.columns),
    }[piece]

  @property
  def flops(self) -> int:
    """Multiplies and adds of one piece (each of the three is the same product, transposed)."""
    return 2 * self.rows * self.depth * self.columns


class Matmul(_Pieces):
  """The three oneDNN matmul primitives of one Dense layer shape, created once.

  Each piece reads XLA's row-major operands where they are: a transposed operand is described to oneDNN
  with swapped strides (tag "ba") rather than copied. Layouts are fixed (no reorders): the matmul kernels
  oneDNN picks for them (brgemm) are its fastest here.
  """

  def __init__(self, shape: MatmulShape):
    rows, depth, columns = shape.rows, shape.depth, shape.columns
    self.shape = shape
    # piece: (source, weights, destination) descriptors, each (dims, tag)
    layouts = {
      "forward": (((rows, depth), "ab"), ((depth, columns), "ab"), ((rows, columns), "ab")),
      "input_gradient": (((rows, columns), "ab"), ((columns, depth), "ba"), ((rows, depth), "ab")),
      "kernel_gradient": (((depth, rows), "ba"), ((rows, columns), "ab"), ((depth, columns), "ab")),
    }
    self._calls = {}
    engine, _ = _engine_and_stream()
    for piece, layout in layouts.items():
      source, weights, destination = (_memory_descriptor(dims, tag) for dims, tag in layout)
      descriptor = _Handle()
      _check(
        _library().dnnl_matmul_primitive_desc_create(
          ctypes.byref(descriptor), engine, source, weights, None, destination, None
        ),
        "dnnl_matmul_primitive_desc_create",
      )
      self._calls[piece] = _Call(descriptor, ((_ARG_SRC, source), (_ARG_WEIGHTS, weights), (_ARG_DST, destination)))
    self.implementations = {piece: call.implementation for piece, call in self._calls.items()}

  def run(self, piece: str, first: int, second: int, result: int) -> None:
    """Computes `piece` from the float32, C-order arrays at addresses `first` and `second` into `result`:
    forward (inputs, kernel) -> outputs; input_gradient (output gradient, kernel) -> input gradient;
    kernel_gradient (inputs, output gradient) -> kernel gradient."""
    if piece not in self._calls:
      raise ValueError(f"unknown matmul piece {piece!r}")
    self._calls[piece](first, second, result)


@dataclass(frozen=True)
class BatchNormShape:
  """A BatchNorm over the channels of float32 NHWC activations, with its epsilon."""

  batch: int
  height: int
  width: int
  channels: int
  epsilon: float

  @property
  def geometry(self) -> np.ndarray:
    """The sizes as 4 int64s (the epsilon travels as a float32 attribute of its own), see `from_attributes`."""
    return np.array([self.batch, self.height, self.width, self.channels], np.int64)

  @classmethod
  def from_attributes(cls, geometry: Sequence[int], epsilon: float) -> "BatchNormShape":
    return cls(*(int(value) for value in geometry), float(epsilon))


class BatchNormRelu:
  """relu(scale * (x - mean) / sqrt(variance + epsilon) + shift) over the batch's own statistics, forward and
  backward for training, as oneDNN's batch normalization with the ReLU fused in (its workspace keeps the
  ReLU's mask, one bit per activation, for the backward pass)."""

  def __init__(self, shape: BatchNormShape):
    library = _library()
    engine, _ = _engine_and_stream()
    self.shape = shape
    data = _memory_descriptor((shape.batch, shape.channels, shape.height, shape.width), "acdb")
    vector = _memory_descriptor((shape.channels,), "a")
    epsilon = ctypes.c_float(shape.epsilon)
    forward, backward = _Handle(), _Handle()
    _check(
      library.dnnl_batch_normalization_forward_primitive_desc_create(
        ctypes.byref(forward), engine, _FORWARD_TRAINING, data, data, epsilon, _SCALE_SHIFT_AND_RELU, None
      ),
      "dnnl_batch_normalization_forward_primitive_desc_create",
    )
    _check(
      library.dnnl_batch_normalization_backward_primitive_desc_create(
        ctypes.byref(backward), engine, _BACKWARD, data, data, data, epsilon, _SCALE_SHIFT_AND_RELU, forward, None
      ),
      "dnnl_batch_normalization_backward_primitive_desc_create",
    )
    workspace = _Handle(library.dnnl_primitive_desc_query_md(forward, _QUERY_WORKSPACE, 0))
    self.workspace_bytes = library.dnnl_memory_desc_get_size(workspace)
    statistics = ((_ARG_MEAN, vector), (_ARG_VARIANCE, vector))
    self._forward = _Call(
      forward,
      (
        (_ARG_SRC, data),
        (_ARG_SCALE, vector),
        (_ARG_SHIFT, vector),
        (_ARG_DST, data),
        *statistics,
        (_ARG_WORKSPACE, workspace),
      ),
    )
    self._backward = _Call(
      backward,
      (
        (_ARG_SRC, data),
        (_ARG_DIFF_DST, data),
        *statistics,
        (_ARG_SCALE, vector),
        (_ARG_WORKSPACE, workspace),
        (_ARG_DIFF_SRC, data),
        (_ARG_DIFF_SCALE, vector),
        (_ARG_DIFF_SHIFT, vector),
      ),
    )
    self.implementations = {"forward": self._forward.implementation, "backward": self._backward.implementation}

  def forward(
    self, inputs: int, scale: int, shift: int, outputs: int, mean: int, variance: int, workspace: int
  ) -> None:
    """From the activations and the float32[channels] scale and shift at those addresses, writes the outputs,
    the batch's mean and (biased) variance, and the workspace (`workspace_bytes`) that `backward` reads."""
    self._forward(inputs, scale, shift, outputs, mean, variance, workspace)

  def backward(
    self,
    inputs: int,
    output_gradient: int,
    mean: int,
    variance: int,
    scale: int,
    workspace: int,
    input_gradient: int,
    scale_gradient: int,
    shift_gradient: int,
  ) -> None:
    """The gradients of the inputs, scale and shift, from the forward pass's inputs, statistics and workspace."""
    self._backward(
      inputs, output_gradient, mean, variance, scale, workspace, input_gradient, scale_gradient, shift_gradient
    )


def _float32(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(array, np.float32)


@functools.cache
def convolution(shape: ConvolutionShape) -> Convolution:
  """The primitives for `shape`, created on first use (a few ms each) and kept for the process."""
  created = Convolution(shape)
  logging.info("oneDNN kernels for %s: %s", shape, created.implementations)
  return created


@functools.cache
def matmul(shape: MatmulShape) -> Matmul:
  """The primitives for `shape`, created on first use and kept for the process."""
  created = Matmul(shape)
  logging.info("oneDNN kernels for %s: %s", shape, created.implementations)
  return created


@functools.cache
def batch_norm_relu(shape: BatchNormShape) -> BatchNormRelu:
  """The primitives for `shape`, created on first use (at trace time: the workspace's size) and kept."""
  created = BatchNormRelu(shape)
  logging.info("oneDNN kernels for %s: %s", shape, created.implementations)
  return created
