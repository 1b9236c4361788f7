"""The train step as XLA compiles it for a GPU or TPU this machine does not have, and what each op moves.

  pip install -e ".[cuda]"      # or ".[tpu]"; no GPU or TPU needed
  python -m benchmarks.accelerator_hlo --config=configs/vgg16.py --target=h100 [--hlo_out=step.hlo.txt]
  python -m benchmarks.accelerator_hlo --config=configs/vgg16.py --target=v5e:2x2

Why: time on a GPU is scarce (issue 10), and XLA compiles without a device for a described target: the CUDA
plugin takes a GpuTargetConfig (benchmarks/gpu_targets/), libtpu a topology name. So the optimised HLO a GPU
run would execute can be read on any machine: which ops XLA emits for each part of the model, the copies and
scatters it adds, and the bytes each op reads and writes. The step is traced as a process on that backend
traces it (the model's per-backend choices, e.g. models.max_pool_2x2, follow the target).

The bytes are an estimate: each op's operands and results, counted once per op. Passes over memory
(elementwise, reductions, copies) are bound by bandwidth on these devices, so their bytes over the target's
bandwidth are a floor for their time; the convolutions and matmuls are summed apart. Autotuning needs a
device, so cuDNN algorithms and GEMM tilings are chosen by heuristics here: the ops and their shapes are those
of a GPU run, the kernels inside them may not be.
"""

import collections
import contextlib
import dataclasses
import os
import pathlib
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from flax_detector import config_overrides, config_validation, sharding, step_profile, train

GPU_TARGETS = pathlib.Path(__file__).parent / "gpu_targets"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration, e.g. configs/vgg16.py.", lock_config=True)
flags.DEFINE_string(
  "target",
  "h100",
  f"A GPU described in {GPU_TARGETS.name}/ ({', '.join(sorted(p.stem for p in GPU_TARGETS.glob('*.txtpb')))}) "
  "or a TPU topology for libtpu, e.g. v5e:2x2 (the batch is split over its chips).",
)
flags.DEFINE_string("hlo_out", "", "Where to write the optimised HLO text of the step ('' keeps it in memory only).")
flags.DEFINE_integer("top", 25, "How many of the ops moving the most bytes to list.")
flags.mark_flag_as_required("config")

# Ops that move no data of their own: views, tuple plumbing, the second half of an async pair.
_NO_TRAFFIC = {"get-tuple-element", "parameter", "bitcast", "tuple", "constant", "copy-done", "slice-done"}
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_ENTRY_OP = re.compile(
  r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>.*?) (?P<opcode>[a-z][\w\-]*)\((?P<args>[^)]*)\)"
)
_COMPUTES = re.compile(r" (convolution|dot)\(")
# XLA:TPU's asynchronous moves between HBM and the chip's own memory (the op that then reads the operand there
# counts it again): listed apart from the model's parts.
_ASYNC_MOVES = {"copy-start", "slice-start"}


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for: the compile-only devices, and the memory bandwidth when the description has one."""

  devices: list[jax.Device]
  bytes_per_second: float | None


@dataclasses.dataclass(frozen=True)
class OpTraffic:
  """One instruction of the compiled step: the bytes it reads and writes, and whether it is a conv or matmul."""

  op: str
  opcode: str
  bytes: int
  computes: bool
  source: str


def target_devices(name: str) -> Target:
  """The compile-only devices of --target: a GPU from its GpuTargetConfig file, else a TPU topology for libtpu."""
  spec = GPU_TARGETS / f"{name}.txtpb"
  if not spec.exists() and ":" not in name:
    raise app.UsageError(f"--target={name}: neither {spec} nor a TPU topology such as v5e:2x2")
  platform = "cuda" if spec.exists() else "tpu"
  try:
    if platform == "tpu":
      return Target(topologies.get_topology_desc(name, "tpu").devices, None)
    text = spec.read_text()
    topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text)
  except (NotImplementedError, RuntimeError) as error:
    raise app.UsageError(
      f"--target={name} needs JAX's {platform} plugin: pip install -e '.[{platform}]' (no device needed). {error}"
    ) from error
  bandwidth = re.search(r"memory_bandwidth: (\d+)", text)
  return Target(topology.devices, float(bandwidth[1]) if bandwidth else None)


@contextlib.contextmanager
def tracing_as(platform: str) -> Iterator[None]:
  """jax.default_backend() answers `platform` meanwhile, so trace-time choices follow the compile's target."""
  default_backend = jax.default_backend
  jax.default_backend = lambda: platform
  try:
    yield
  finally:
    jax.default_backend = default_backend


def compile_train_step(config: ml_collections.ConfigDict, target: Target) -> jax.stages.Compiled:
  """The trainer's train step for config's model, batch and image size, compiled for the target's devices."""
  mesh = jax.sharding.Mesh(np.asarray(target.devices), (sharding.DATA_AXIS,))
  steps = max(config.min_train_steps, 1)
  _, init_state = train.state_initializer(config, steps_per_epoch=steps, total_steps=steps)
  abstract_state = jax.eval_shape(init_state)
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.sharding)
  state = jax.tree.map(
    lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), abstract_state, state_shardings
  )
  rows, side, split = config.batch_size, config.image_size, sharding.batch_sharding(mesh)
  batch = {
    "image": jax.ShapeDtypeStruct((rows, side, side, 3), jnp.uint8, sharding=split),
    "label": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split),
    "mask": jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=split),
  }
  class_weights = np.ones(len(config.data.class_names), np.float32)  # values do not change the program
  step = train.jit_train_step(class_weights, state_shardings, mesh)
  with tracing_as("gpu" if target.devices[0].platform in ("cuda", "rocm", "gpu") else target.devices[0].platform):
    return step.trace(state, batch).lower().compile()


def array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string such as (bf16[8,4]{1,0}, s32[8]{0})."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    width = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
    total += width * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
  return total


def op_traffic(compiled_text: str) -> list[OpTraffic]:
  """Each instruction of the entry computation that moves data, with its operands' and results' bytes."""
  sources = step_profile.hlo_sources(compiled_text)
  computations = dict(re.findall(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", compiled_text, flags=re.S))
  entry = compiled_text[compiled_text.index("\nENTRY") :]
  shapes: dict[str, str] = {}
  ops = []
  for line in entry.splitlines()[1:]:
    if not (match := _ENTRY_OP.match(line)):
      continue
    shapes[match["name"]] = match["shape"]
    if match["opcode"] in _NO_TRAFFIC:
      continue
    operands = re.findall(r"%([\w.\-]+)", match["args"])
    called = re.search(r"calls=%([\w.\-]+)", line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    computes = bool(
      (called and _COMPUTES.search(computations.get(called[1], "")))
      or (target and re.search("cudnn|cublas|gemm", target[1]))
      or match["opcode"] in ("convolution", "dot")
    )
    ops.append(
      OpTraffic(
        op=match["name"],
        opcode=target[1] if target else match["opcode"],
        bytes=array_bytes(match["shape"]) + sum(array_bytes(shapes.get(name, "")) for name in operands),
        computes=computes,
        source=sources.get(match["name"], ""),
      )
    )
  return ops


def summary_lines(ops: list[OpTraffic], bytes_per_second: float | None, top: int) -> list[str]:
  """The totals, the passes over memory summed per part of the model, then the `top` passes moving the most."""
  passes = [op for op in ops if not op.computes]
  moved, passes_moved = sum(op.bytes for op in ops), sum(op.bytes for op in passes)
  floor = ""
  if bytes_per_second:
    floor = f", at least {passes_moved / bytes_per_second * 1e3:.2f} ms at the target's bandwidth"
  lines = [
    f"{len(ops)} ops move {moved / 1e9:.2f} GB per step: convolutions and matmuls "
    f"{(moved - passes_moved) / 1e9:.2f} GB, the other {len(passes)} ops {passes_moved / 1e9:.2f} GB{floor}.",
    "Passes over memory by part of the model (GB, ops):",
  ]
  by_part: collections.Counter[str] = collections.Counter()
  count: collections.Counter[str] = collections.Counter()
  for op in passes:
    part = "moves to on-chip memory" if op.opcode in _ASYNC_MOVES else step_profile.model_part(op.source)
    by_part[part] += op.bytes
    count[part] += 1
  lines += [f"{moved_by / 1e9:9.2f} {count[part]:4d}  {part}" for part, moved_by in by_part.most_common()]
  lines.append(f"The {top} passes moving the most (GB, opcode, op, model source):")
  for op in sorted(passes, key=lambda op: -op.bytes)[:top]:
    source = re.sub(r"^jit\(train_step\)/", "", op.source)
    lines.append(f"{op.bytes / 1e9:9.3f}  {op.opcode:16s} {op.op}  ({source})")
  return lines


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Before JAX starts its backends: the CUDA plugin's version check initialises the driver, which fails
  # without a GPU (compiling needs neither), and this process's own arrays stay on its CPU.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  jax.config.update("jax_platforms", "cpu")
  config = ml_collections.ConfigDict(FLAGS.config.to_dict())
  config.model.library = "xla"  # oneDNN is the CPU's
  config = config_validation.validate(config)
  target = target_devices(FLAGS.target)
  compiled = compile_train_step(config, target)
  text = compiled.as_text()
  if FLAGS.hlo_out:
    pathlib.Path(FLAGS.hlo_out).write_text(text)
  print(
    f"Train step for {FLAGS.target} ({target.devices[0].device_kind}, {len(target.devices)} devices): "
    f"{config.image_size} px, batch {config.batch_size}, {config.model.dtype}, "
    f"batch_norm={config.model.batch_norm}, jax {jax.__version__}"
  )
  cost = compiled.cost_analysis()  # where the backend's compiler gives one (XLA:TPU does, XLA:GPU does not)
  if cost:
    print(
      f"XLA's cost analysis, per device: {cost['flops'] / 1e9:.1f} GFLOP, "
      f"{cost['bytes accessed'] / 1e9:.2f} GB accessed"
    )
  print("\n".join(summary_lines(op_traffic(text), target.bytes_per_second, FLAGS.top)))


if __name__ == "__main__":
  app.run(main, flags_parser=config_overrides.parse_flags)
