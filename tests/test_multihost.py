"""The multi-host path on one machine: several `flax_detector.main` processes joined by jax.distributed.

Tolerance: another topology sums gradients and BatchNorm statistics in another order, and training
amplifies those float rounding differences step by step. Loss series across topologies agree to 1e-4
over the first 10 steps and to 1e-2 over 30 (observed: 1e-5 and 4e-3); a wrong batch would differ by
far more from step 1 on. The same topology reproduces bitwise, including across a preemption.
"""

import json
import shutil
import signal
import time

import numpy as np
import pytest
from local_jobs import config_flags, read_scalars, run_job, series, start_job, wait_job

FLAGS = config_flags(num_epochs=7, log_every_steps=1)  # 63 steps of a 16-image global batch
EARLY_STEPS, EARLY_ATOL, LATE_ATOL = 10, 1e-4, 1e-2


def assert_same_series(actual, expected):
  assert len(actual) == len(expected)
  np.testing.assert_allclose(actual[:EARLY_STEPS], expected[:EARLY_STEPS], rtol=0, atol=EARLY_ATOL)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=LATE_ATOL)


@pytest.fixture(scope="module")
def reference_2x2(tmp_path_factory):
  """An uninterrupted job of two processes with two devices each."""
  workdir = tmp_path_factory.mktemp("reference_2x2")
  run_job(workdir, 2, 2, FLAGS)
  return workdir


@pytest.mark.parametrize("num_processes, devices_per_process", [(1, 4), (1, 1)])
def test_loss_series_does_not_depend_on_topology(reference_2x2, tmp_path, num_processes, devices_per_process):
  run_job(tmp_path, num_processes, devices_per_process, FLAGS + ["--config.num_train_steps=30"])
  losses = series(tmp_path, "train_loss")
  assert len(losses) == 30
  assert_same_series(losses, series(reference_2x2, "train_loss")[:30])


def test_only_process_zero_reports(reference_2x2):
  assert (reference_2x2 / "final_metrics.json").exists()
  assert len(list(reference_2x2.glob("events.out.tfevents.*"))) == 1
  assert "train_loss=" in (reference_2x2 / "process_0.log").read_text()
  assert "train_loss=" not in (reference_2x2 / "process_1.log").read_text()


def _wait_for_step(log_path, step: int, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if f"] [{step}] " in log_path.read_text():
      return
    time.sleep(0.05)
  raise AssertionError(f"step {step} never logged in {log_path}")


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())


def test_sigterm_on_every_host_saves_and_the_rerun_finishes_identically(reference_2x2, tmp_path):
  processes = start_job(tmp_path, 2, 2, FLAGS)
  _wait_for_step(tmp_path / "process_0.log", 5)
  for process in processes:
    process.send_signal(signal.SIGTERM)
  wait_job(processes, tmp_path)  # both exit cleanly (code 0)
  stopped_at = _checkpoint_steps(tmp_path)[-1]
  assert 5 <= stopped_at < 63 and not (tmp_path / "final_metrics.json").exists()
  interrupted = tmp_path.parent / f"{tmp_path.name}_at_stop"
  shutil.copytree(tmp_path, interrupted)

  run_job(tmp_path, 2, 2, FLAGS)
  reference = json.loads((reference_2x2 / "final_metrics.json").read_text())
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == reference
  np.testing.assert_array_equal(series(tmp_path, "train_loss"), series(reference_2x2, "train_loss"))

  # The same checkpoint resumes on another process count (Grain's iterator state cannot, so the
  # data iterator restarts at the checkpoint's step, which yields the same batches).
  run_job(interrupted, 1, 4, FLAGS)
  resumed = read_scalars(interrupted)["train_loss"]
  assert sorted(resumed) == list(range(1, 64))
  # Steps before the stop are the 2x2 run's own; after it, 1x4 rounding applies.
  reference_losses = series(reference_2x2, "train_loss")
  np.testing.assert_array_equal([resumed[s] for s in range(1, stopped_at + 1)], reference_losses[:stopped_at])
  np.testing.assert_allclose([resumed[s] for s in range(1, 64)], reference_losses, rtol=0, atol=LATE_ATOL * 5)
  moved = json.loads((interrupted / "final_metrics.json").read_text())
  assert moved["num_examples"] == reference["num_examples"] and moved["checkpoint_step"] == 63


def test_sigterm_on_a_single_process_run_saves_and_resumes(reference_2x2, tmp_path):
  processes = start_job(tmp_path, 1, 4, FLAGS)
  _wait_for_step(tmp_path / "process_0.log", 5)
  processes[0].send_signal(signal.SIGTERM)
  wait_job(processes, tmp_path)  # exit code 0
  stopped_at = _checkpoint_steps(tmp_path)[-1]
  assert 5 <= stopped_at < 63 and not (tmp_path / "final_metrics.json").exists()
  assert "Preempted at step" in (tmp_path / "process_0.log").read_text()
  run_job(tmp_path, 1, 4, FLAGS)
  resumed = read_scalars(tmp_path)["train_loss"]
  assert sorted(resumed) == list(range(1, 64))
  assert_same_series(np.array([resumed[s] for s in range(1, 64)])[:30], series(reference_2x2, "train_loss")[:30])
  assert json.loads((tmp_path / "final_metrics.json").read_text())["checkpoint_step"] == 63
