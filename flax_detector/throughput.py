"""Where does a run's time go? Rates of the train step, the real loop, evaluation and the input pipeline.

Each part isolates one thing: the train step alone on a batch already on the devices (its compile time,
its FLOPs from XLA's cost analysis and the share of the device's peak they reach: MFU); the real loop
(train.train_and_evaluate with its input, metrics, validation and checkpoints) as a fraction of that
step; the eval step alone; the input pipeline alone. `torch_reference` runs benchmarks/torch_reference.py,
the same model, batch and optimizer in PyTorch, so the two can be timed side by side on the same machine.

Everything is built by train.build_experiment, exactly as training builds it: the benchmark measures the
trainer's own step, not a copy. flax_detector.benchmark is the command line over these functions.
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_detector import compute_library, input_pipeline, matmul, onednn_calls, sharding

if TYPE_CHECKING:  # CLU's writers import TensorFlow; Grain's workers re-import `benchmark` and this module
  from clu import metric_writers

TORCH_REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"

# Dense bf16 peak per chip in TFLOP/s, from the vendors' data sheets, by a substring of jax's device_kind
# (first match wins, so the more specific names come first). Other devices and dtypes: measured.
PUBLISHED_BF16_PEAK_TFLOPS = (
  ("H100 PCIe", 756.0),
  ("H200", 989.0),
  ("H100", 989.0),
  ("A100", 312.0),
  ("L4", 121.0),
  ("TPU v6 lite", 918.0),
  ("TPU v5 lite", 197.0),
  ("TPU v5", 459.0),
  ("TPU v4", 275.0),
)


def _best_seconds(run_once: Any, rounds: int) -> float:
  """The fastest of `rounds` calls: on a shared machine, the round least disturbed by other work."""
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    run_once()
    best = min(best, time.perf_counter() - start)
  return best


def measured_peak_flops(dtype: str, rounds: int = 8) -> float:
  """FLOP/s of a large square matmul in `dtype` on the first device: what this device can do at best.

  On a CPU where oneDNN computes the model (flax_detector.compute_library) the faster of XLA's and oneDNN's
  matmul counts, so that MFU stays a fraction of what the machine can do.
  """
  side = 2048 if jax.default_backend() == "cpu" else 8192
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(key, (side, side), jnp.dtype(dtype)) for key in keys)
  products = [jnp.matmul]
  if jnp.dtype(dtype) == jnp.float32 and compute_library.onednn_unusable_reason() is None:
    products.append(functools.partial(matmul.onednn_dot_general, dimension_numbers=(((1,), (0,)), ((), ()))))
  best = float("inf")
  for product in products:
    compiled = jax.jit(product)
    jax.block_until_ready(compiled(a, b))
    best = min(best, _best_seconds(lambda compiled=compiled: jax.block_until_ready(compiled(a, b)), rounds))
  return 2 * side**3 / best


def peak_flops(dtype: str) -> tuple[float, str]:
  """(FLOP/s of one device, where the figure comes from): published for bf16 on known accelerators."""
  kind = jax.devices()[0].device_kind
  if jax.default_backend() != "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
    for name, tflops in PUBLISHED_BF16_PEAK_TFLOPS:
      if name in kind:
        return tflops * 1e12, f"published bf16 peak of {kind}"
  return measured_peak_flops(dtype), f"measured {dtype} matmul on {kind}"


def against_measured_peak(step_summary: Mapping[str, Any], dtype: str) -> dict[str, float]:
  """Where MFU was taken against a published peak: the device's measured matmul peak and MFU against it.

  A data-sheet peak is above what the card's best matmul reaches (issue 10 quotes an H200's MFU against its
  measured 790 TFLOP/s, not the published 989), so accelerator runs report the step against both. Empty
  where the peak was measured already (CPUs, unknown devices).
  """
  if not step_summary["peak_source"].startswith("published"):
    return {}
  measured = measured_peak_flops(dtype)
  published = step_summary["peak_tflops_per_device"] * 1e12
  return {
    "measured_peak_tflops_per_device": measured / 1e12,
    "train_mfu_of_measured_peak": step_summary["train_mfu"] * published / measured,
  }


def resident_batch(experiment: Any, batch_size: int, views: int = 0) -> dict[str, jax.Array]:
  """A global batch of random uint8 images already on the devices; `views` > 0 gives an eval batch."""
  local = batch_size // jax.process_count()
  side = experiment.config.image_size
  rng = np.random.default_rng(0)
  shape = (local, views, side, side, 3) if views else (local, side, side, 3)
  return sharding.to_global_batch(
    {
      "image": rng.integers(0, 256, shape, dtype=np.uint8),
      "label": rng.integers(0, len(experiment.config.data.class_names), local).astype(np.int32),
      "mask": np.ones(local, bool),
    },
    experiment.batch_sharding,
  )


@dataclasses.dataclass
class TrainStepTimer:
  """The trainer's compiled train step on a resident batch, timed in rounds that can interleave with others."""

  experiment: Any
  compiled: Any
  state: Any
  batch: dict[str, jax.Array]
  compile_seconds: float
  flops_per_step: float

  @classmethod
  def create(cls, experiment: Any, warmup: int) -> "TrainStepTimer":
    state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
    batch = resident_batch(experiment, experiment.config.batch_size)
    start = time.perf_counter()
    compiled = experiment.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    # Per device: under jit over a mesh, XLA analyses the partitioned program one device runs. oneDNN's
    # convolutions and matmuls are custom calls XLA cannot see into (one-device runs only); counted apart.
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    flops += onednn_calls.host_flops(experiment.train_step.trace(state, batch).jaxpr.jaxpr)
    timer = cls(experiment, compiled, state, batch, compile_seconds, flops)
    timer.run(warmup)
    return timer

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps, dispatched back to back as the training loop does."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, _ = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def summary(self, best_seconds: float, steps: int, peak: tuple[float, str]) -> dict[str, Any]:
    steps_per_second = steps / best_seconds
    abstract, shardings = self.experiment.abstract_state, self.experiment.state_shardings
    return {
      "train_steps_per_second": steps_per_second,
      "train_images_per_second": steps_per_second * self.experiment.config.batch_size,
      "train_compile_seconds": self.compile_seconds,
      "train_gflop_per_image": self.flops_per_step
      * self.experiment.mesh.size
      / self.experiment.config.batch_size
      / 1e9,
      "train_mfu": self.flops_per_step * steps_per_second / peak[0],
      "peak_tflops_per_device": peak[0] / 1e12,
      "peak_source": peak[1],
      "devices": self.experiment.mesh.size,
      "device_kind": jax.devices()[0].device_kind,
      "sharding": self.experiment.config.sharding,
      "params_mib_per_device": sharding.bytes_per_device(abstract.params, shardings.params) / 2**20,
      "optimizer_mib_per_device": sharding.bytes_per_device(abstract.opt_state, shardings.opt_state) / 2**20,
    }


def measure_eval_step(experiment: Any, steps: int, warmup: int, rounds: int = 1) -> dict[str, float]:
  """Images/s of the trainer's eval step (every image scored as eval_grid x eval_grid views) on a resident batch."""
  views = experiment.config.data.eval_grid**2
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  batch = resident_batch(experiment, experiment.config.eval_batch_size, views)

  def run(count: int) -> None:
    jax.block_until_ready([experiment.eval_step(state, batch) for _ in range(count)])

  run(max(warmup, 1))  # the first call compiles
  images_per_second = steps * experiment.config.eval_batch_size / _best_seconds(lambda: run(steps), rounds)
  return {
    "eval_images_per_second": images_per_second,
    "eval_views_per_image": views,
    "eval_crops_per_second": images_per_second * views,
  }


def measure_input(experiment: Any, steps: int, warmup: int) -> dict[str, float]:
  """Process-local images/s of the training pipeline, with the configured number of Grain workers.

  It reads the experiment's own training split, so the data is indexed (and, with data.cache_decoded,
  decoded into memory) once per benchmark run, as training does it.
  """
  config = experiment.config
  dataset = input_pipeline.train_dataset(
    experiment.splits.train,
    input_pipeline.TrainSettings.from_config(config),
    jax.process_index(),
    jax.process_count(),
  )
  if len(dataset) < steps + warmup:
    raise ValueError(f"--steps={steps} + --warmup={warmup} exceed the {len(dataset)} training batches of this config")
  with contextlib.closing(
    input_pipeline.make_iterator(dataset, config.data.worker_count, config.data.worker_buffer_size)
  ) as iterator:
    for _ in range(warmup):
      next(iterator)
    start = time.perf_counter()
    images = sum(len(next(iterator)["label"]) for _ in range(steps))
    seconds = time.perf_counter() - start
  return {"input_images_per_second": images / seconds, "input_worker_count": config.data.worker_count}


class _ClockedWriter:
  """The run's own metric writer, noting when each train_loss passes through it.

  It times the loop without reading TensorBoard files back, so the end-to-end part also works where
  TensorFlow is absent and the TensorBoard writer writes nothing (the GPU image, ../shared/gpu).
  """

  def __init__(self, writer: "metric_writers.MetricWriter", times: list[tuple[int, float]]) -> None:
    self._writer, self._times = writer, times

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if "train_loss" in scalars:
      self._times.append((int(step), time.time()))
    self._writer.write_scalars(step, scalars)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._writer, name)


class _PauseClock:
  """Wall time of the loop's pauses (one method of a class, patched): each from when the device caught up.

  A validation or a checkpoint save starts by waiting for the train steps already queued on the device;
  that wait is training, so each pause is timed from jax.block_until_ready of the method's `state`
  argument to its return.
  """

  def __init__(self, owner: type, method: str) -> None:
    self._patch = mock.patch.object(owner, method, self._timed(getattr(owner, method)))
    self.spans: list[tuple[float, float]] = []

  def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
      jax.block_until_ready(signature.bind(*args, **kwargs).arguments["state"])
      start = time.time()
      try:
        return method(*args, **kwargs)
      finally:
        self.spans.append((start, time.time()))

    return timed

  def __enter__(self) -> "_PauseClock":
    self._patch.start()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._patch.stop()

  def within(self, start: float, end: float) -> tuple[int, float]:
    """How many pauses fell between start and end, and their seconds."""
    inside = [(begin, finish) for begin, finish in self.spans if start <= begin and finish <= end]
    return len(inside), sum(finish - begin for begin, finish in inside)


def measure_end_to_end(config: ml_collections.ConfigDict, steps: int) -> dict[str, float]:
  """The real loop, train.train_and_evaluate, for `steps` steps in a fresh workdir.

  Its rate is taken between the first and the last logged training loss: after compilation, before the
  final test evaluation, with the input pipeline, metrics, validation and checkpoints in between as
  they fall at the config's cadence. The validations' and checkpoint saves' share of that time is
  reported too, and the rate without them: what is left is the loop's own cost (input, transfers,
  metrics) against the step alone.
  """
  from flax_detector import checkpoint, train  # pylint: disable=g-import-not-at-top  (see main.py)

  if steps < 2 * config.log_every_steps:
    raise ValueError(
      f"--e2e_steps={steps} logs the training loss fewer than twice at log_every_steps="
      f"{config.log_every_steps}; raise --e2e_steps or lower --config.log_every_steps to time the loop"
    )
  run_config = ml_collections.ConfigDict(config.to_dict())
  run_config.num_train_steps = steps
  logged: list[tuple[int, float]] = []
  create_writer = train._create_writer  # pylint: disable=protected-access

  def create_clocked_writer(workdir: Any, is_chief: bool) -> Any:
    return _ClockedWriter(create_writer(workdir, is_chief), logged)

  with (
    tempfile.TemporaryDirectory() as workdir,
    mock.patch.object(train, "_create_writer", create_clocked_writer),
    _PauseClock(train.Evaluator, "__call__") as validations,
    _PauseClock(checkpoint.Checkpointer, "save") as saves,
  ):
    start = time.time()
    train.train_and_evaluate(run_config, workdir)
    total_seconds = time.time() - start
  logged.sort()
  (first_step, first_time), (last_step, last_time) = logged[0], logged[-1]
  steps_per_second = (last_step - first_step) / (last_time - first_time)
  validation_passes, validation_seconds = validations.within(first_time, last_time)
  checkpoint_saves, checkpoint_seconds = saves.within(first_time, last_time)
  training_seconds = last_time - first_time - validation_seconds - checkpoint_seconds
  return {
    "e2e_steps_per_second": steps_per_second,
    "e2e_images_per_second": steps_per_second * config.batch_size,
    "e2e_total_seconds": total_seconds,
    "e2e_steps": steps,
    "e2e_after_loop_seconds": total_seconds - (last_time - start),
    "e2e_validation_passes": validation_passes,
    "e2e_validation_seconds": validation_seconds,
    "e2e_checkpoint_saves": checkpoint_saves,
    "e2e_checkpoint_seconds": checkpoint_seconds,
    "e2e_images_per_second_between_pauses": (last_step - first_step) * config.batch_size / training_seconds,
  }


def torch_reference_args(experiment: Any, mode: str, steps: int, warmup: int, threads: int = 0) -> list[str]:
  """benchmarks/torch_reference.py's arguments for the experiment's model, batch, dtype and optimizer."""
  config = experiment.config
  device = {"gpu": "cuda", "cpu": "cpu"}.get(jax.default_backend())
  if device is None:
    raise ValueError(f"--compare_torch runs PyTorch on CPU or CUDA; this backend is {jax.default_backend()}")
  return [
    f"--mode={mode}",
    f"--device={device}",
    f"--batch_size={config.batch_size}",
    f"--image_size={config.image_size}",
    f"--width_multiplier={config.model.width_multiplier}",
    "--batch_norm" if config.model.batch_norm else "--no-batch_norm",
    f"--dtype={config.model.dtype}",
    f"--num_classes={len(config.data.class_names)}",
    f"--dropout_rate={config.model.dropout_rate}",
    f"--learning_rate={config.learning_rate}",
    f"--weight_decay={config.weight_decay}",
    f"--grad_clip_norm={config.grad_clip_norm}",
    f"--warmup_steps={max(1, int(config.warmup_epochs * experiment.steps_per_epoch))}",
    f"--total_steps={experiment.total_steps}",
    f"--steps={steps}",
    f"--warmup={warmup}",
    f"--threads={threads}",
  ]


def run_torch_reference(args: list[str], timeout_seconds: float) -> dict[str, Any]:
  """One run of the PyTorch reference in its own process; a failure or timeout comes back as "torch_error"."""
  command = [sys.executable, str(TORCH_REFERENCE), *args]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds, check=False)
  except subprocess.TimeoutExpired:
    return {"torch_error": f"no result within {timeout_seconds:.0f} s"}
  if done.returncode != 0:
    lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
    return {"torch_error": lines[-1]}
  return json.loads(done.stdout.strip().splitlines()[-1])
