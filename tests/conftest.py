"""Test set-up: 8 simulated CPU devices and a compilation cache (set before JAX is imported), a tiny config."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every tiny training run compiles the same programs: the initialisation alone takes ~35 s on this CPU, the
# train step ~15 s, and Orbax's slices of each array ~10 s. One persistent compilation cache per session lets
# every later run load them, in this process or in the runs it starts (they inherit the environment). A new,
# empty one each session, so no test reads what another session left; an executable loaded from it is the
# one XLA compiled, so numerics (and the golden digest) are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_compilation_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs.vgg16 import get_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax_detector import compilation, host_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position

host_allocator.keep_freed_memory_mapped()  # as every command does, before JAX starts its CPU backend
compilation.generate_cpu_code_at_o2()

# Grain defines absl flags and reads them in its worker processes; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The cpu preset shrunk so a run takes seconds: 1/16 width, 32-px crops, a few hundred images."""
  config = get_config("cpu")
  config.image_size = 32
  config.batch_size = 16
  config.eval_batch_size = 24  # 3 per device: the last eval batch is partial and must be padded
  config.num_epochs = 2
  config.min_train_steps = 0
  config.model.width_multiplier = 1 / 16
  config.data.worker_count = 0
  config.data.cache_decoded = False  # the preset's "auto" would cache; tests/test_decoded_cache.py covers it
  config.data.eval_grid = 2
  config.data.synthetic_train_size = 160
  config.data.synthetic_test_size = 40
  config.data.synthetic_min_side = 32
  config.data.synthetic_max_side = 48
  config.log_every_steps = 5
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split("__")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.fixture
def make_config():
  return tiny_config


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny end-to-end run on the 8 simulated devices, shared by the tests that read its outputs."""
  from flax_detector import train  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(tiny_config(), str(workdir))
  return workdir


def pytest_configure(config):
  # Orbax runs a restore's TensorStore reads on an event loop that it closes as soon as one read fails
  # (orbax/checkpoint/_src/asyncio_utils.py, _run_sync_via_new_loop), and the reads still in flight then
  # finish on TensorStore's threads and call the closed loop's call_soon_threadsafe. Python reports that
  # as an unraisable "Event loop is closed" in whichever test runs at that moment. Only the tests that
  # damage a checkpoint make a read fail; the error is Orbax's and costs nothing but the line.
  config.addinivalue_line(
    "filterwarnings",
    r"ignore:(?s)Exception ignored in. None.*in call_soon_threadsafe.*Event loop is closed"
    ":pytest.PytestUnraisableExceptionWarning",
  )


@pytest.fixture
def onednn_allowed(monkeypatch):
  """The tests run on 8 simulated devices, where "auto" picks XLA; a model applied without a mesh can use
  oneDNN, so the device condition is lifted for the test (and the cached choice cleared around it)."""
  from flax_detector import compute_library, onednn  # pylint: disable=g-import-not-at-top

  if onednn.why_unavailable() is not None:
    pytest.skip(onednn.why_unavailable())
  monkeypatch.setattr(compute_library, "onednn_unusable_reason", lambda: None)
  compute_library.uses_onednn.cache_clear()
  yield
  compute_library.uses_onednn.cache_clear()
