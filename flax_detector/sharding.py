"""The device mesh, the shardings the steps use, and host-local batches turned into global arrays.

One 1-D mesh axis, "data", spans every device of every host in `jax.devices()` order, which keeps
each process's devices contiguous: process p's local batch is rows [p*b, (p+1)*b) of the global one.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
SHARDING_STRATEGIES = ("dp", "fsdp")
# Leaves smaller than this (4 KiB of float32) stay replicated under "fsdp": gathering them would cost
# more latency than the memory they take.
FSDP_MIN_SIZE = 2**10


def create_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Splits the largest dimension that divides evenly over the data axis; replicates small leaves."""
  if np.prod(shape, dtype=np.int64) < FSDP_MIN_SIZE or num_shards == 1:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      return P(*[DATA_AXIS if a == axis else None for a in range(len(shape))])
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, strategy: str) -> Any:
  """The sharding of every leaf of the train state under `config.sharding` (one of SHARDING_STRATEGIES).

  "dp" replicates parameters and optimizer state on every device. "fsdp" splits each large
  parameter and its optimizer moments over the data axis (ZeRO-3 style); XLA gathers a layer's
  weights when the step needs them. Both compute the same function of the same global batch.
  """
  if strategy == "fsdp":
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, mesh.shape[DATA_AXIS])), abstract_state)
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
  """Bytes the arrays of `abstract_tree` occupy on one device under `shardings` (nothing is allocated)."""
  return sum(
    int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True)
  )


def check_divisible(batch_size: int, setting: str, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(
      f"{setting}={batch_size} must be divisible by the {mesh.size} devices of the mesh "
      f"({jax.process_count()} process(es)); pick a multiple of {mesh.size}"
    )


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles every process's share into global arrays split on the data axis (no copy across hosts)."""
  return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}
