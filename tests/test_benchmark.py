import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from clu import metric_writers

from flax_detector import input_pipeline, models, throughput, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny config of conftest.tiny_config, as command-line overrides of the cpu preset.
TINY_FLAGS = [
  "--config=configs/vgg16.py:cpu",
  "--config.image_size=32",
  "--config.batch_size=16",
  "--config.eval_batch_size=16",
  "--config.model.width_multiplier=0.0625",
  "--config.data.worker_count=0",
  "--config.data.eval_grid=2",
  "--config.data.synthetic_train_size=160",
  "--config.data.synthetic_test_size=40",
  "--config.data.synthetic_min_side=32",
  "--config.data.synthetic_max_side=48",
]


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repository root, its output captured."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    check=False,
  )


def _torch_reference():
  torch = pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location("torch_reference", throughput.TORCH_REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return torch, module


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torch_reference_has_the_flax_models_parameter_count(batch_norm):
  torch, reference = _torch_reference()
  del torch
  flax_model = models.VGG16(num_classes=2, batch_norm=batch_norm, width_multiplier=0.25)
  shapes = jax.eval_shape(lambda: models.init_variables(flax_model, 64, jax.random.key(0)))["params"]
  flax_count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
  torch_model = reference.vgg16(2, batch_norm, 0.25, 0.5)
  assert sum(p.numel() for p in torch_model.parameters()) == flax_count


def test_cli_prints_each_part_and_the_torch_ratio():
  compare = ["--compare_torch", "--notorch_compile"] if importlib.util.find_spec("torch") else []
  done = _run_module(
    "flax_detector.benchmark", *TINY_FLAGS, "--parts=step,eval,input", "--steps=2", "--warmup=1", "--rounds=1", *compare
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  assert results["devices"] == 8  # conftest's simulated devices reach the child through XLA_FLAGS
  assert results["train_images_per_second"] == pytest.approx(results["train_steps_per_second"] * 16)
  assert results["train_gflop_per_image"] > 0 and 0 < results["train_mfu"] < 1
  assert results["eval_images_per_second"] > 0 and results["eval_views_per_image"] == 4
  assert results["input_images_per_second"] > 0
  # AdamW keeps two moments per parameter (plus a few scalars).
  assert results["optimizer_mib_per_device"] == pytest.approx(2 * results["params_mib_per_device"], rel=0.01)
  assert "train step alone" in done.stdout
  if compare:
    assert results["jax_over_torch_eager"] == pytest.approx(
      results["train_images_per_second"] / results["torch_eager_images_per_second"]
    )


@pytest.mark.parametrize("command", ["flax_detector.benchmark", "flax_detector.import_weights"])
def test_an_override_of_no_config_field_is_one_line_naming_the_field_meant(command):
  """Every command with a --config flag parses it as the trainer does (flax_detector.config_overrides)."""
  done = _run_module(command, "--config=configs/vgg16.py:cpu", "--config.model.convolutions=xla")
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (
    "error: --config.model.convolutions: the config has no field 'model.convolutions'; "
    "it was renamed --config.model.library."
  )


def test_end_to_end_rate_comes_from_the_real_loop(make_config, monkeypatch):
  # A writer that writes nothing, as on the GPU image without TensorFlow: the rate must not come from files.
  monkeypatch.setattr(train, "_create_writer", lambda workdir, is_chief: metric_writers.MultiWriter([]))
  config = make_config(num_train_steps=10, log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=4)
  results = throughput.measure_end_to_end(config, steps=10)
  assert results["e2e_steps"] == 10 and results["e2e_images_per_second"] > 0
  assert results["e2e_total_seconds"] > results["e2e_after_loop_seconds"] > 0
  # Between the first and the last logged loss (steps 2 and 10): validations and saves at steps 4 and 8;
  # the last step's come after its loss is logged.
  assert results["e2e_validation_passes"] == 2 and results["e2e_checkpoint_saves"] == 2
  assert results["e2e_validation_seconds"] > 0 and results["e2e_checkpoint_seconds"] > 0
  assert results["e2e_images_per_second_between_pauses"] > results["e2e_images_per_second"]


def test_input_rate_reads_the_experiments_own_split(make_config, monkeypatch):
  """The input part times the experiment's training split; it does not index (or decode) the data again."""
  experiment = train.build_experiment(make_config(data__worker_count=0))
  monkeypatch.setattr(input_pipeline, "load_splits", lambda *args, **kwargs: pytest.fail("splits loaded again"))
  results = throughput.measure_input(experiment, steps=2, warmup=1)
  assert results["input_images_per_second"] > 0 and results["input_worker_count"] == 0


def test_mfu_against_a_published_peak_is_also_given_against_the_measured_one(monkeypatch):
  monkeypatch.setattr(throughput, "measured_peak_flops", lambda dtype: 500e12)
  published = {"peak_source": "published bf16 peak of NVIDIA H200", "peak_tflops_per_device": 1000.0, "train_mfu": 0.3}
  assert throughput.against_measured_peak(published, "bfloat16") == {
    "measured_peak_tflops_per_device": 500.0,
    "train_mfu_of_measured_peak": pytest.approx(0.6),
  }
  assert (
    throughput.against_measured_peak({**published, "peak_source": "measured float32 matmul on cpu"}, "float32") == {}
  )


def test_end_to_end_needs_two_logged_losses(make_config):
  with pytest.raises(ValueError, match="log_every_steps"):
    throughput.measure_end_to_end(make_config(log_every_steps=100), steps=3)


def test_conv_kernels_times_each_of_vgg16s_convolutions_once():
  from benchmarks import conv_kernels  # pylint: disable=g-import-not-at-top

  shapes = conv_kernels.model_convolutions(width_multiplier=0.125, image_size=64)
  assert sum(shapes.values()) == 13  # VGG16's 13 convolutions, shapes shared by several layers counted once
  assert shapes[(3, 8, 64)] == 1 and shapes[(64, 64, 8)] == 2 and shapes[(64, 64, 4)] == 3
  runs, kernels = conv_kernels.jax_pieces(2, (4, 4, 8), "float32", jax.lax.conv_general_dilated)
  best = conv_kernels.measure({"jax": runs}, rounds=2)
  assert set(kernels) == set(conv_kernels.PIECES) and set(kernels.values()) <= {"YNNPACK", "Eigen"}
  assert set(best["jax"]) == set(conv_kernels.PIECES)
  assert all(0 < milliseconds < float("inf") for milliseconds in best["jax"].values())
