"""The device mesh, the shardings the steps use, and host-local batches turned into global arrays.

One 1-D mesh axis, "data", spans every device of every host in `jax.devices()` order, which keeps
each process's devices contiguous: process p's local batch is rows [p*b, (p+1)*b) of the global one.
"""

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
SHARDING_STRATEGIES = ("dp",)


def create_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: Mesh, strategy: str) -> Any:
  """The sharding of every leaf of the train state under `config.sharding`."""
  if strategy not in SHARDING_STRATEGIES:
    raise ValueError(f"sharding={strategy!r}: use one of {SHARDING_STRATEGIES}")
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def check_divisible(batch_size: int, setting: str, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"{setting}={batch_size} must be divisible by the {mesh.size} devices of the mesh "
                     f"({jax.process_count()} process(es)); pick a multiple of {mesh.size}")


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles every process's share into global arrays split on the data axis (no copy across hosts)."""
  return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}
