"""Joining JAX's multi-controller runtime: one process per host, all running the same program."""

import os

import jax
from absl import logging


def _detected_cluster() -> str | None:
  """Names the multi-process environment JAX can configure itself from, if any.

  SLURM: srun exports the task count and ids. Cloud TPU VM: the TPU devices are present and JAX
  reads the slice's workers from the VM metadata (a single-host slice initialises as 1 process).
  """
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "SLURM"
  if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
    return "Cloud TPU VM"
  return None


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """Calls jax.distributed.initialize when this run spans several processes.

  Explicit flags win (any cluster, and local multi-process tests); otherwise SLURM and Cloud TPU VMs
  are detected. CPU devices use the gloo collectives, so several local CPU processes form one job.
  Must run before anything touches a JAX backend.
  """
  explicit = {
    "--coordinator_address": coordinator_address,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) != len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise ValueError(
      f"{', '.join(given)} given without {', '.join(missing)}: pass all three flags, or none "
      f"to let SLURM or the TPU VM configure the job"
    )
  cluster = "explicit flags" if given else _detected_cluster()
  if cluster is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if given:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()
  logging.info("Joined a %d-process JAX job (%s) as process %d", jax.process_count(), cluster, jax.process_index())
