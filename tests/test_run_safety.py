"""A run is never counted wrong or lost: bad checkpoints, full disks, a busy workdir, orphans, NaN, user errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from local_jobs import REPO, config_flags

from flax_detector import checkpoint, errors, run_lock, train
from flax_detector.models import create_model

NEWEST, OLDER = 18, 9  # the tiny trained_workdir saves once per epoch of 9 steps


def _abstract_variables(config):
  model = create_model(config.model, 2)
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.uint8)
  abstract = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, dummy, train=False))
  return {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}


def _break(step_dir, how: str) -> None:
  if how == "manifest_deleted":
    (step_dir / "state" / "manifest.ocdbt").unlink()
  elif how == "data_truncated":
    for data_file in step_dir.glob("state/**/d/*"):
      with open(data_file, "r+b") as handle:
        handle.truncate(data_file.stat().st_size // 2)
  elif how == "folder_emptied":
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  elif how == "topology_missing":
    shutil.rmtree(step_dir / "topology")


@pytest.fixture
def checkpoints_copy(trained_workdir, tmp_path):
  shutil.copytree(trained_workdir / "checkpoints", tmp_path / "checkpoints")
  return tmp_path / "checkpoints"


@pytest.mark.parametrize("how", ["manifest_deleted", "data_truncated", "folder_emptied"])
def test_prediction_skips_an_unreadable_newest_checkpoint(checkpoints_copy, make_config, how, caplog):
  _break(checkpoints_copy / str(NEWEST), how)
  _, step = checkpoint.restore_model_variables(checkpoints_copy, _abstract_variables(make_config()))
  assert step == OLDER
  skipped = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(skipped) == 1 and f"step {NEWEST}" in skipped[0], skipped


@pytest.mark.parametrize("how", ["manifest_deleted", "topology_missing"])
def test_training_resumes_from_the_newest_checkpoint_that_restores(checkpoints_copy, make_config, how):
  _break(checkpoints_copy / str(NEWEST), how)
  config = make_config()
  experiment = train.build_experiment(config, checkpoints_copy.parent)
  with checkpoint.Checkpointer(checkpoints_copy, 9, 3, checkpoint.Topology(1, 0)) as checkpointer:
    state, iterator = train._restore_or_initialize(experiment, checkpointer)  # pylint: disable=protected-access
    iterator.close()
  assert int(state.step) == OLDER


def test_a_run_resumed_past_a_damaged_checkpoint_finishes_as_if_never_stopped(trained_workdir, make_config, tmp_path):
  """The damaged step is moved aside (kept), so the resumed run can write that step again."""
  shutil.copytree(trained_workdir / "checkpoints", tmp_path / "checkpoints")
  _break(tmp_path / "checkpoints" / str(NEWEST), "manifest_deleted")
  final = train.train_and_evaluate(make_config(), str(tmp_path))
  assert final["checkpoint_step"] == NEWEST
  assert final == json.loads((trained_workdir / "final_metrics.json").read_text())
  aside = list((tmp_path / "unrestorable_checkpoints").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith(f"{NEWEST}-")


def test_no_restorable_checkpoint_is_a_clear_error(checkpoints_copy, make_config):
  for step in (NEWEST, OLDER):
    _break(checkpoints_copy / str(step), "manifest_deleted")
  with pytest.raises(checkpoint.NoUsableCheckpointError, match="new --workdir, or delete"):
    checkpoint.restore_model_variables(checkpoints_copy, _abstract_variables(make_config()))


def test_partial_saves_are_removed_at_start(tmp_path):
  partial = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
  partial.mkdir(parents=True)
  (partial / "half_written").write_text("x")
  with checkpoint.Checkpointer(tmp_path / "checkpoints", 5, 3, checkpoint.Topology(1, 0)):
    assert not partial.exists()


def test_a_failed_save_stops_the_run_and_keeps_earlier_checkpoints(make_config, tmp_path, monkeypatch):
  original_save, calls = grain.checkpoint.CheckpointHandler.save, []

  def full_disk_after_the_first(self, directory, item=None, args=None):
    calls.append(directory)
    if len(calls) > 1:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return original_save(self, directory, item, args)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full_disk_after_the_first)
  with pytest.raises(checkpoint.CheckpointWriteError, match="checkpoint at step 6 could not be written: No space"):
    train.train_and_evaluate(make_config(checkpoint_every_steps=3, num_train_steps=9), str(tmp_path))
  _, step = checkpoint.restore_model_variables(tmp_path / "checkpoints", _abstract_variables(make_config()))
  assert step == 3


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(make_config, tmp_path, monkeypatch):
  healthy_step = train.train_step

  def diverging_step(state, batch, *, class_weights):
    new_state, step_metrics = healthy_step(state, batch, class_weights=class_weights)
    poison = jnp.where(state.step >= 7, jnp.nan, 1.0)  # params turn NaN after step 8; its loss is still finite
    return new_state.replace(params=jax.tree.map(lambda p: p * poison, new_state.params)), step_metrics

  monkeypatch.setattr(train, "train_step", diverging_step)
  with pytest.raises(errors.RunStoppedError, match=r"training loss is nan at step 9 \(the mean over steps 6..9\)"):
    train.train_and_evaluate(make_config(checkpoint_every_steps=3, num_train_steps=12), str(tmp_path))
  variables, step = checkpoint.restore_model_variables(tmp_path / "checkpoints", _abstract_variables(make_config()))
  assert step == 6
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(variables))


def test_the_lock_names_its_holder(tmp_path):
  with run_lock.hold(tmp_path):
    with pytest.raises(run_lock.WorkdirInUseError, match=f"pid {os.getpid()} on "):
      with run_lock.hold(tmp_path):
        pass
  with run_lock.hold(tmp_path):  # released on exit
    pass


def _main(workdir, *flags, **popen_args) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen(
    [sys.executable, "-m", "flax_detector.main", f"--workdir={workdir}", *flags],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **popen_args,
  )


def test_a_second_run_on_a_busy_workdir_exits_at_once_naming_the_first(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\nfrom flax_detector import run_lock\n"
      "with run_lock.hold(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(600)",
      str(tmp_path),
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    second = _main(tmp_path, "--config=configs/vgg16.py:cpu")
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 2, output
    assert f"is in use by another run (pid {holder.pid} on " in output and "Traceback" not in output
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with run_lock.hold(tmp_path):  # a killed holder leaves nothing stuck
    pass


@pytest.mark.parametrize(
  "flag, named",
  [
    (
      "--config.data.wrker_count=1",
      "--config.data.wrker_count: the config has no field 'data.wrker_count'; did you mean --config.data.worker_count?",
    ),
    (
      "--config.model.convolutions=xla",
      "--config.model.convolutions: the config has no field 'model.convolutions'; "
      "it was renamed --config.model.library.",
    ),
    ("--config.image_size=8", "image_size=8: VGG16 needs at least 32"),
  ],
)
def test_user_errors_are_one_message_and_exit_code_2(tmp_path, flag, named):
  run = _main(tmp_path, "--config=configs/vgg16.py:cpu", flag)
  output, _ = run.communicate(timeout=180)
  assert run.returncode == 2, output
  assert f"error: {named}" in output and "Traceback" not in output


def _children(pid: int) -> list[int]:
  children = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if fields[1] == str(pid) and "spawn_main" in open(f"/proc/{entry}/cmdline").read():
      children.append(int(entry))
  return children


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as stat:
      return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
  except OSError:
    return False


def _wait_for(condition, timeout: float, what: str):
  deadline = time.time() + timeout
  while time.time() < deadline:
    result = condition()
    if result:
      return result
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what}")


def test_grain_workers_die_with_a_killed_run_which_then_resumes_quietly(tmp_path):
  flags = config_flags(data__worker_count=1, num_epochs=50, checkpoint_every_steps=2)
  first = _main(tmp_path, *flags)
  try:
    _wait_for(lambda: (tmp_path / "checkpoints" / "2").is_dir(), 300, "the first checkpoint")
    workers = _wait_for(lambda: _children(first.pid), 60, "a Grain worker")
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  _wait_for(lambda: not any(_alive(pid) for pid in workers), 10, f"Grain workers {workers} to exit")

  resumed = _main(tmp_path, *flags, "--config.num_train_steps=4")
  output, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, output[-3000:]
  assert "Resumed from checkpoint step" in output
  for noise in ("libtpu", "leaked shared_memory", 'Item "data_iter"', "Traceback"):
    assert noise not in output, noise
