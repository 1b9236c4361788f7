"""Orbax checkpoints of the train state together with the Grain iterator that feeds it.

A checkpoint holds three items written atomically by Orbax: the train state, the Grain iterator
state (so a resumed run continues the same data order) and the topology the iterator state was
written under. Grain cannot restore an iterator state into another number of processes or Grain
workers; since the data order is a pure function of the step (see input_pipeline), a run resumed
on another topology starts its iterator at the restored step instead, which yields the same batches.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from flax_detector import workdir

_STATE, _DATA, _TOPOLOGY = "state", "data_iter", "topology"


@dataclasses.dataclass(frozen=True)
class Topology:
  """What a saved Grain iterator state depends on."""

  process_count: int
  worker_count: int


class Checkpointer:
  """Saves every `every_steps` steps (and when forced), keeps the newest `max_to_keep`."""

  def __init__(self, directory: epath.PathLike, every_steps: int, max_to_keep: int, topology: Topology):
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(every_steps), policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(max_to_keep),
        enable_async_checkpointing=True,
    )
    self.directory = workdir.absolute(directory)
    self._topology = topology
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _DATA, _TOPOLOGY),
                                          item_handlers={_STATE: ocp.StandardCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice; call it from every host every step."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, *, force: bool = False) -> bool:
    """Starts an asynchronous save if the policy (or `force`) asks for one; returns whether it did."""
    if not force and not self._manager.should_save(step):
      return False
    return self._manager.save(step, force=force, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: grain.checkpoint.CheckpointSave(data_iterator),
        _TOPOLOGY: ocp.args.JsonSave(dataclasses.asdict(self._topology)),
    }))

  def restore(self, step: int, abstract_state: Any,
              make_data_iterator: Callable[[int], grain.DatasetIterator]) -> tuple[Any, grain.DatasetIterator]:
    """Restores the state at `step` onto the shardings in `abstract_state`, and its data iterator.

    `make_data_iterator(start_step)` builds the training iterator positioned at `start_step`.
    """
    saved = self._manager.restore(step, args=ocp.args.Composite(**{_TOPOLOGY: ocp.args.JsonRestore()}))
    saved_topology = Topology(**saved[_TOPOLOGY])
    self._check_fits(step, abstract_state)
    state = self._manager.restore(step, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state)}))[_STATE]
    if saved_topology == self._topology:
      data_iterator = make_data_iterator(0)
      self._manager.restore(step, args=ocp.args.Composite(**{_DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
    else:
      logging.info("Checkpoint %d was written by %s, this run is %s: positioning the data iterator at step %d "
                   "(same data order).", step, saved_topology, self._topology, step)
      data_iterator = make_data_iterator(step)
    return state, data_iterator

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Compares array names and shapes with the checkpoint's metadata before reading any array."""
    saved = _shapes_by_name(self._manager.item_metadata(step)[_STATE])
    expected = _shapes_by_name(abstract_state)
    differences = [f"{name}: saved {saved.get(name)}, config needs {expected.get(name)}"
                   for name in sorted(set(saved) | set(expected)) if saved.get(name) != expected.get(name)]
    if differences:
      raise ValueError(
          f"{self.directory / str(step)}: this checkpoint does not fit the model and optimizer of the current config "
          f"({len(differences)} arrays differ, e.g. {'; '.join(differences[:3])}). Resume with the config it was "
          f"trained with (see config.json in the workdir) or use a new --workdir.")

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and surfaces their errors."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/Conv_0/kernel": shape, ...} for a state pytree or Orbax's metadata of one."""

  def name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))

  return {"/".join(name(entry) for entry in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that tell Orbax where each restored array goes."""
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract_state, shardings)


def restore_model_variables(directory: epath.PathLike, abstract_variables: Any, step: int | None = None) -> tuple[Any, int]:
  """Restores only {"params", "batch_stats"} of a saved train state (no optimizer state), for inference.

  Returns (variables, step); `step` None means the latest checkpoint.
  """
  manager = ocp.CheckpointManager(workdir.absolute(directory), item_names=(_STATE, _DATA, _TOPOLOGY),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint found; train first with flax_detector.main")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
        item=abstract_variables, restore_args=restore_args, partial_restore=True)}))
    return restored[_STATE], step
  finally:
    manager.close()
