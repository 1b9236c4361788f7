"""Command line over flax_detector.throughput: where does a run's time go, and how does PyTorch compare?

  python -m flax_detector.benchmark --config=configs/vgg16.py:cpu [--parts=step,e2e,eval,input,profile]
      [--compare_torch]

Prints a few readable lines, then one JSON object with every figure: the train step alone on a resident
batch (images/s, compile time, GFLOP per image from XLA's cost analysis, MFU over the device's peak),
the real training loop end to end and its fraction of the step alone, the eval step alone, and the
input pipeline alone; `profile` adds the train step's longest XLA operations, each named by the model
code it came from (step_profile). With --compare_torch, benchmarks/torch_reference.py runs the same model, batch,
dtype and optimizer in PyTorch (eager, then torch.compile) in between the JAX rounds, so both sides see
the same machine at the same time; each side's figure is its best round.
"""

import dataclasses
import json
import pathlib
import tempfile
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from flax_detector import (
  compilation,
  config_overrides,
  config_validation,
  distributed,
  host_allocator,
  step_profile,
  throughput,
)

PARTS = ("step", "e2e", "eval", "input", "profile")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration, e.g. configs/vgg16.py:cpu.", lock_config=True)
flags.DEFINE_list("parts", list(PARTS[:-1]), f"What to measure, any of {','.join(PARTS)}.")
flags.DEFINE_integer("steps", 20, "Timed steps (or input batches) per round, after the warm-up.")
flags.DEFINE_integer("warmup", 3, "Untimed steps or batches first (compilation, worker start-up).")
flags.DEFINE_integer("rounds", 3, "Timed rounds of the train and eval steps; the best round counts.")
flags.DEFINE_integer(
  "e2e_steps",
  100,
  "Training steps of the end-to-end run (the loop's rate is timed between its first and last logged loss).",
)
flags.DEFINE_bool("compare_torch", False, "Also time benchmarks/torch_reference.py (pip install -e '.[bench]').")
flags.DEFINE_bool("torch_compile", True, "With --compare_torch, also time torch.compile (once, after the rounds).")
flags.DEFINE_integer(
  "torch_threads",
  0,
  "PyTorch's intra-op threads (torch.set_num_threads); 0 keeps its default, one "
  "per core. On a CPU other jobs are using, PyTorch's spinning OpenMP threads slow down many times "
  "over; 1 thread then shows what it can do.",
)
flags.DEFINE_string(
  "profile_dir", "", "Where the profile part keeps its jax.profiler trace (TensorBoard, Perfetto); '' a temp folder."
)
flags.DEFINE_integer("profile_top", 25, "How many of the train step's longest operations the profile part lists.")
flags.DEFINE_integer("torch_timeout", 900, "Seconds each PyTorch run may take, compilation included.")
flags.mark_flag_as_required("config")


def _run_torch(experiment: Any, mode: str) -> dict[str, Any]:
  args = throughput.torch_reference_args(experiment, mode, FLAGS.steps, FLAGS.warmup, FLAGS.torch_threads)
  return throughput.run_torch_reference(args, FLAGS.torch_timeout)


def _step_with_torch(experiment: Any, timer: throughput.TrainStepTimer) -> dict[str, Any]:
  """The train step alone, in rounds interleaved with PyTorch eager rounds when --compare_torch."""
  best_jax, torch_eager = float("inf"), None
  for _ in range(FLAGS.rounds):
    best_jax = min(best_jax, timer.run(FLAGS.steps))
    if FLAGS.compare_torch:
      result = _run_torch(experiment, "eager")
      if torch_eager is None or result.get("torch_images_per_second", 0) > torch_eager.get(
        "torch_images_per_second", 0
      ):
        torch_eager = result
  dtype = experiment.config.model.dtype
  results = timer.summary(best_jax, FLAGS.steps, throughput.peak_flops(dtype))
  results.update(throughput.against_measured_peak(results, dtype))
  if FLAGS.compare_torch:
    results.update(_torch_side("eager", torch_eager, results["train_images_per_second"]))
    if FLAGS.torch_compile:
      compiled = _run_torch(experiment, "compile")
      results.update(_torch_side("compile", compiled, results["train_images_per_second"]))
  return results


def _torch_side(mode: str, result: dict[str, Any], jax_images_per_second: float) -> dict[str, Any]:
  """One PyTorch mode's figures under torch_<mode>_* keys, with JAX's images/s over PyTorch's."""
  side = {f"torch_{mode}_{key.removeprefix('torch_')}": value for key, value in result.items()}
  if "torch_images_per_second" in result:
    side[f"jax_over_torch_{mode}"] = jax_images_per_second / result["torch_images_per_second"]
  return side


def _measure(config: ml_collections.ConfigDict) -> dict[str, Any]:
  from flax_detector import train  # pylint: disable=g-import-not-at-top  (see main.py: keeps Grain workers light)

  experiment = train.build_experiment(config)
  config = experiment.config  # with the crop size the data supports
  results: dict[str, Any] = {
    "platform": jax.default_backend(),
    "batch_size": config.batch_size,
    "image_size": config.image_size,
    "dtype": config.model.dtype,
    "width_multiplier": config.model.width_multiplier,
    "batch_norm": config.model.batch_norm,
    "jax_version": jax.__version__,
  }
  if "step" in FLAGS.parts or "profile" in FLAGS.parts:
    # One compiled step serves both parts; it is dropped before the end-to-end run builds its own state.
    timer = throughput.TrainStepTimer.create(experiment, FLAGS.warmup)
    if "step" in FLAGS.parts:
      results.update(_step_with_torch(experiment, timer))
    if "profile" in FLAGS.parts:
      times = _profile(timer)
      results["profile_parts"] = [dataclasses.asdict(entry) for entry in step_profile.by_model_part(times)]
      results["profile_ops"] = [dataclasses.asdict(entry) for entry in step_profile.longest(times, FLAGS.profile_top)]
    del timer
  if "e2e" in FLAGS.parts:
    results.update(throughput.measure_end_to_end(config, FLAGS.e2e_steps))
    if "train_images_per_second" in results:
      step_rate = results["train_images_per_second"]
      results["e2e_fraction_of_step"] = results["e2e_images_per_second"] / step_rate
      results["e2e_fraction_of_step_between_pauses"] = results["e2e_images_per_second_between_pauses"] / step_rate
  if "eval" in FLAGS.parts:
    results.update(throughput.measure_eval_step(experiment, FLAGS.steps, FLAGS.warmup, FLAGS.rounds))
  if "input" in FLAGS.parts:
    results.update(throughput.measure_input(experiment, FLAGS.steps, FLAGS.warmup))
  return results


def _profile(timer: throughput.TrainStepTimer) -> list[step_profile.OpTime]:
  with tempfile.TemporaryDirectory() as scratch:
    trace_dir = pathlib.Path(FLAGS.profile_dir or scratch)
    return step_profile.profile_train_step(timer, FLAGS.steps, trace_dir)


def summary_lines(results: dict[str, Any]) -> list[str]:
  """The headline figures, one per line, for a person reading the terminal."""
  lines = []
  for key, label in (
    ("train_images_per_second", "train step alone"),
    ("e2e_images_per_second", "end to end"),
    ("e2e_images_per_second_between_pauses", "end to end, less pauses"),
    ("torch_eager_images_per_second", "PyTorch eager"),
    ("torch_compile_images_per_second", "PyTorch torch.compile"),
    ("eval_images_per_second", "eval step alone"),
    ("input_images_per_second", "input pipeline"),
  ):
    if key in results:
      lines.append(f"{label:>24}: {results[key]:10.1f} images/s")
  for key, label in (
    ("train_mfu", "MFU of the train step"),
    ("train_mfu_of_measured_peak", "MFU of the measured peak"),
    ("e2e_fraction_of_step", "end to end / step alone"),
    ("e2e_fraction_of_step_between_pauses", "less pauses / step alone"),
    ("jax_over_torch_eager", "JAX / PyTorch eager"),
    ("jax_over_torch_compile", "JAX / torch.compile"),
  ):
    if key in results:
      lines.append(f"{label:>24}: {results[key]:10.3f}")
  for seconds, count, label in (
    ("e2e_validation_seconds", "e2e_validation_passes", "validation passes"),
    ("e2e_checkpoint_seconds", "e2e_checkpoint_saves", "checkpoint saves"),
  ):
    if seconds in results:
      lines.append(f"{label:>24}: {results[seconds]:10.2f} s in {results[count]} (paused the loop)")
  lines += [f"{key:>24}: {results[key]}" for key in ("torch_eager_error", "torch_compile_error") if key in results]
  for key, title in (("profile_parts", "Train step by part of the model:"), ("profile_ops", "Longest operations:")):
    if key in results:
      lines += [title, *step_profile.table([step_profile.OpTime(**entry) for entry in results[key]])]
  return lines


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.parts) - set(PARTS))
  if unknown:
    raise app.UsageError(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
  host_allocator.keep_freed_memory_mapped()  # before JAX starts, as training does
  compilation.generate_cpu_code_at_o2()
  distributed.initialize(None, None, None)
  results = _measure(config_validation.validate(FLAGS.config))
  logging.info("Benchmark: %s", results)
  if jax.process_index() == 0:
    print("\n".join(summary_lines(results)))
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  app.run(main, flags_parser=config_overrides.parse_flags)
