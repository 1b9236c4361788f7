"""XLA FFI custom-call handlers written in Python, through ctypes: no compiler, no extension module.

Why not `jax.pure_callback`: it hands the function jax.Arrays (a device_put of every operand), XLA copies
every operand and result of a Python host callback once more, and JAX keeps no program with host callbacks
in its persistent compilation cache. An FFI handler reads and writes XLA's own buffers in place, and a
program that calls one is cached like any other (the handler is found by name when it runs).

The structs below mirror xla/ffi/api/c_api.h (XLA FFI API 0.x, shipped in jaxlib/include), whose layout
XLA keeps binary compatible; only the fields read here are declared past the last one needed.
A handler runs on XLA's CPU threads and takes the GIL for its Python part; what it calls through ctypes
(oneDNN) runs without it.
"""

import ctypes
from collections.abc import Callable, Sequence

import jax

_Size, _Address = ctypes.c_size_t, ctypes.c_void_p
# XLA_FFI_DataType_S64 and _F32: the element types an array attribute may have here.
_ELEMENT_POINTERS = {5: ctypes.POINTER(ctypes.c_int64), 11: ctypes.POINTER(ctypes.c_float)}
_EXTENSION_METADATA = 1  # XLA_FFI_Extension_Metadata
_STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_ATTRIBUTE_ARRAY = 1  # XLA_FFI_AttrType_ARRAY
_ERROR_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL
_API_VERSION = (0, 3)  # XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR of the header these structs follow


class _ExtensionBase(ctypes.Structure):
  _fields_ = [("struct_size", _Size), ("type", ctypes.c_int), ("next", _Address)]


class _ApiVersion(ctypes.Structure):
  _fields_ = [("struct_size", _Size), ("extension_start", _Address), ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _Metadata(ctypes.Structure):
  _fields_ = [("struct_size", _Size), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
  _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
  _fields_ = [("struct_size", _Size), ("extension_start", _Address), ("dtype", ctypes.c_int), ("data", _Address)]


class _ByteSpan(ctypes.Structure):
  _fields_ = [("ptr", ctypes.c_char_p), ("len", _Size)]


class _Array(ctypes.Structure):
  _fields_ = [("dtype", ctypes.c_int), ("size", _Size), ("data", _Address)]


class _Values(ctypes.Structure):
  """XLA_FFI_Args and XLA_FFI_Rets (same layout): `size` buffers with their types."""

  _fields_ = [
    ("struct_size", _Size),
    ("extension_start", _Address),
    ("size", ctypes.c_int64),
    ("types", ctypes.POINTER(ctypes.c_int)),
    ("values", ctypes.POINTER(_Address)),
  ]


class _Attributes(ctypes.Structure):
  _fields_ = [
    ("struct_size", _Size),
    ("extension_start", _Address),
    ("size", ctypes.c_int64),
    ("types", ctypes.POINTER(ctypes.c_int)),
    ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
    ("values", ctypes.POINTER(_Address)),
  ]


class _CallFrame(ctypes.Structure):
  _fields_ = [
    ("struct_size", _Size),
    ("extension_start", _Address),
    ("api", _Address),
    ("ctx", _Address),
    ("stage", ctypes.c_int),
    ("args", _Values),
    ("rets", _Values),
    ("attrs", _Attributes),
  ]


class _ErrorCreateArgs(ctypes.Structure):
  _fields_ = [
    ("struct_size", _Size),
    ("extension_start", _Address),
    ("message", ctypes.c_char_p),
    ("code", ctypes.c_int),
  ]


class _ApiHead(ctypes.Structure):
  """The start of XLA_FFI_Api: its first function is XLA_FFI_Error_Create."""

  _fields_ = [
    ("struct_size", _Size),
    ("extension_start", _Address),
    ("api_version", _ApiVersion),
    ("internal_api", _Address),
    ("error_create", _Address),
  ]


_ErrorCreate = ctypes.CFUNCTYPE(_Address, ctypes.POINTER(_ErrorCreateArgs))
_Handler = ctypes.CFUNCTYPE(_Address, _Address)
# Registered handlers must outlive every program that calls them: kept for the process.
_REGISTERED: dict[str, ctypes._CFuncPtr] = {}

# The Python side of a handler: (operand addresses, result addresses, int64 or float32 array attributes by
# name, as tuples: hashable, so a handler can look up what it prepared for them).
HandlerFunction = Callable[[Sequence[int], Sequence[int], dict[str, tuple[int, ...] | tuple[float, ...]]], None]


def _addresses(values: _Values) -> list[int]:
  return [_Buffer.from_address(values.values[i]).data for i in range(values.size)]


def _array_attributes(attributes: _Attributes) -> dict[str, tuple[int, ...] | tuple[float, ...]]:
  arrays = {}
  for i in range(attributes.size):
    if attributes.types[i] != _ATTRIBUTE_ARRAY:
      continue
    name = attributes.names[i].contents.ptr[: attributes.names[i].contents.len].decode()
    array = _Array.from_address(attributes.values[i])
    if array.dtype not in _ELEMENT_POINTERS:
      raise TypeError(f"array attribute {name!r} has XLA_FFI_DataType {array.dtype}; use int64 or float32")
    arrays[name] = tuple(ctypes.cast(array.data, _ELEMENT_POINTERS[array.dtype])[: array.size])
  return arrays


def _error(frame: _CallFrame, message: str) -> int:
  """An XLA_FFI_Error for XLA to raise (as a JaxRuntimeError carrying `message`)."""
  create = _ErrorCreate(_ApiHead.from_address(frame.api).error_create)
  arguments = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), _ERROR_INTERNAL)
  return create(ctypes.byref(arguments))


def _handler(name: str, function: HandlerFunction) -> ctypes._CFuncPtr:
  def handle(frame_address: int) -> int | None:
    frame = _CallFrame.from_address(frame_address)
    try:
      if frame.extension_start:
        extension = _ExtensionBase.from_address(frame.extension_start)
        if extension.type == _EXTENSION_METADATA:  # XLA asking which API version and traits the handler has
          metadata = _MetadataExtension.from_address(frame.extension_start).metadata.contents
          metadata.api_version.major, metadata.api_version.minor = _API_VERSION
          metadata.traits = 0
          return None
      if frame.stage != _STAGE_EXECUTE:
        return None
      function(_addresses(frame.args), _addresses(frame.rets), _array_attributes(frame.attrs))
      return None
    except Exception as error:  # noqa: BLE001 (any failure must reach XLA as an error, not a crash)
      return _error(frame, f"{name}: {type(error).__name__}: {error}")

  return _Handler(handle)


def register_cpu_target(name: str, function: HandlerFunction) -> None:
  """Registers `function` as the CPU custom-call target `name` for jax.ffi.ffi_call (once per process)."""
  if name in _REGISTERED:
    return
  handler = _handler(name, function)
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
  _REGISTERED[name] = handler
