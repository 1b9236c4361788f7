import pytest

from flax_detector import distributed


def test_partial_flags_name_the_missing_ones():
  with pytest.raises(ValueError, match="--num_processes, --process_id"):
    distributed.initialize("127.0.0.1:1234", None, None)


def test_single_machine_runs_without_a_distributed_runtime(monkeypatch):
  for name in ("SLURM_NTASKS", "SLURM_PROCID"):
    monkeypatch.delenv(name, raising=False)
  distributed.initialize(None, None, None)  # nothing to join: returns without touching jax.distributed


def test_slurm_with_several_tasks_is_detected(monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_PROCID", "1")
  assert distributed._detected_cluster() == "SLURM"  # pylint: disable=protected-access
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed._detected_cluster() in (None, "Cloud TPU VM")  # pylint: disable=protected-access
