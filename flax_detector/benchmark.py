"""Throughput of the input pipeline and of the train step, measured apart: where does time go?

  python -m flax_detector.benchmark --config=configs/vgg16.py:cpu [--steps=50] [--part=all|input|train]

Prints one JSON object: input images/s (decode + augment in the configured Grain workers), train
steps/s and images/s (on a fixed batch already on the devices, so the input pipeline is not in
the way), the compile time and the per-device memory of parameters and optimizer state. The two
rates bound a real run: it goes as fast as the slower of them.
"""

import contextlib
import json
import time
from typing import Any

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from flax_detector import config_validation, distributed, input_pipeline, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration, e.g. configs/vgg16.py:cpu.", lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed batches or steps per part, after the warm-up.")
flags.DEFINE_integer("warmup", 3, "Untimed batches or steps first (compilation, worker start-up).")
flags.DEFINE_enum("part", "all", ["all", "input", "train"], "What to measure.")
flags.mark_flag_as_required("config")


def benchmark_input(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict[str, float]:
  """Process-local images/s of the training pipeline, with the configured number of Grain workers."""
  splits = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config))
  dataset = input_pipeline.train_dataset(splits.train, input_pipeline.TrainSettings.from_config(config),
                                         jax.process_index(), jax.process_count())
  if len(dataset) < steps + warmup:
    raise ValueError(f"--steps={steps} + --warmup={warmup} exceed the {len(dataset)} training batches of this config")
  with contextlib.closing(input_pipeline.make_iterator(dataset, config.data.worker_count,
                                                      config.data.worker_buffer_size)) as iterator:
    for _ in range(warmup):
      next(iterator)
    start = time.perf_counter()
    images = sum(len(next(iterator)["label"]) for _ in range(steps))
    seconds = time.perf_counter() - start
  return {"input_images_per_second": images / seconds, "input_worker_count": config.data.worker_count}


def benchmark_train_step(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
  """Steps/s of the jitted train step on a fixed global batch."""
  from flax_detector import train  # pylint: disable=g-import-not-at-top  (see main.py: keeps Grain workers light)

  experiment = train.build_experiment(config)
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  local_batch = config.batch_size // jax.process_count()
  rng = np.random.default_rng(0)
  batch = sharding.to_global_batch({
      "image": rng.integers(0, 256, (local_batch, config.image_size, config.image_size, 3), dtype=np.uint8),
      "label": rng.integers(0, len(config.data.class_names), local_batch).astype(np.int32),
      "mask": np.ones(local_batch, bool)}, experiment.batch_sharding)
  start = time.perf_counter()
  compiled = experiment.train_step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  for _ in range(warmup):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  abstract, shardings = experiment.abstract_state, experiment.state_shardings
  return {
      "train_steps_per_second": steps / seconds,
      "train_images_per_second": steps * config.batch_size / seconds,
      "compile_seconds": compile_seconds,
      "devices": experiment.mesh.size,
      "sharding": config.sharding,
      "params_mib_per_device": sharding.bytes_per_device(abstract.params, shardings.params) / 2**20,
      "optimizer_mib_per_device": sharding.bytes_per_device(abstract.opt_state, shardings.opt_state) / 2**20,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize(None, None, None)
  config = config_validation.validate(FLAGS.config)
  results: dict[str, Any] = {"platform": jax.devices()[0].platform, "batch_size": config.batch_size,
                             "image_size": config.image_size}
  if FLAGS.part in ("all", "input"):
    results.update(benchmark_input(config, FLAGS.steps, FLAGS.warmup))
  if FLAGS.part in ("all", "train"):
    results.update(benchmark_train_step(config, FLAGS.steps, FLAGS.warmup))
  logging.info("Benchmark: %s", results)
  if jax.process_index() == 0:
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
