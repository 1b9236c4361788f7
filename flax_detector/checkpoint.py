"""Orbax checkpoints of the train state together with the Grain iterator that feeds it.

A checkpoint holds three items written atomically by Orbax: the train state, the Grain iterator
state (so a resumed run continues the same data order) and the topology the iterator state was
written under. Grain cannot restore an iterator state into another number of processes or Grain
workers; since the data order is a pure function of the step (see input_pipeline), a run resumed
on another topology starts its iterator at the restored step instead, which yields the same batches.

A run should never be lost to one bad checkpoint: the newest checkpoint that cannot be read (a
deleted manifest, truncated data, an emptied step folder) is skipped with one warning for the next
older one, and folders of saves that never finished are removed at start. A save that cannot be
written (a full disk) stops the run with one message naming the step and the cause.
"""

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from flax_detector import errors, workdir

_STATE, _DATA, _TOPOLOGY = "state", "data_iter", "topology"
_PARTIAL_SAVE = "*.orbax-checkpoint-tmp*"  # Orbax writes a step here and renames it when complete
_T = TypeVar("_T")


class CheckpointMismatchError(errors.UserError, ValueError):
  """The checkpoint holds a model or optimizer of other shapes than the config builds."""


class NoUsableCheckpointError(errors.UserError, FileNotFoundError):
  """No checkpoint, or none that can be restored (a FileNotFoundError for callers that catch that)."""


class CheckpointWriteError(errors.RunStoppedError):
  """A checkpoint could not be written (full disk, lost permissions, ...)."""


def _item_handlers() -> dict[str, Any]:
  """Handlers for every item, so restoring or reading metadata of some items never warns about the others."""
  return {
    _STATE: ocp.StandardCheckpointHandler(),
    _DATA: grain.checkpoint.CheckpointHandler(),
    _TOPOLOGY: ocp.JsonCheckpointHandler(),
  }


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
        [policies.FixedIntervalPolicy(every_steps), policies.PreemptionCheckpointingPolicy()]
      ),
      preservation_policy=policies.LatestN(max_to_keep),
      enable_async_checkpointing=True,
    )
    self.directory = workdir.absolute(directory)
    self._topology = topology
    self._pending_step: int | None = None  # the step of an asynchronous save not yet known to be written
    self._failed = False
    if jax.process_index() == 0:
      remove_partial_saves(self.directory)
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_STATE, _DATA, _TOPOLOGY), item_handlers=_item_handlers()
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice; call it from every host every step."""
    return self._manager.reached_preemption(step)

  def will_save(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would write a checkpoint."""
    return force or self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, *, force: bool = False) -> bool:
    """Starts an asynchronous save if the policy (or `force`) asks for one; returns whether it did.

    Raises CheckpointWriteError when this save, or the previous one still being written, fails.
    """
    if not self.will_save(step, force=force):
      return False
    self.wait_until_finished()  # Orbax waits for the previous save anyway; this names its step if it failed
    with self._writing(step):
      started = self._manager.save(
        step,
        force=force,
        args=ocp.args.Composite(
          **{
            _STATE: ocp.args.StandardSave(state),
            _DATA: grain.checkpoint.CheckpointSave(data_iterator),
            _TOPOLOGY: ocp.args.JsonSave(dataclasses.asdict(self._topology)),
          }
        ),
      )
    self._pending_step = step if started else self._pending_step
    return started

  def restore_latest(
    self, abstract_state: Any, make_data_iterator: Callable[[int], grain.DatasetIterator]
  ) -> tuple[Any, grain.DatasetIterator] | None:
    """The newest checkpoint that restores (older ones are tried after a warning), or None if there is none.

    `abstract_state` gives shapes and shardings; `make_data_iterator(start_step)` builds the training
    iterator positioned at `start_step`.
    """
    if not self._manager.all_steps():
      return None
    restored, step = newest_restorable(
      self._manager, self.directory, lambda step: self.restore(step, abstract_state, make_data_iterator)
    )
    self._set_aside_newer_than(step)
    logging.info("Resumed from checkpoint step %d in %s", step, self.directory)
    return restored

  def _set_aside_newer_than(self, step: int) -> None:
    """Moves the unrestorable steps after `step` out of the way, kept for inspection, never deleted.

    Training from `step` reaches their step numbers again, and Orbax refuses to save over an existing
    step; a later resume should not try them again either.
    """
    newer = [later for later in self._manager.all_steps() if later > step]
    if not newer:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / workdir.UNRESTORABLE_CHECKPOINTS
      aside.mkdir(parents=True, exist_ok=True)
      for later in newer:
        target = aside / f"{later}-{time.strftime('%Y%m%dT%H%M%S')}"
        (self.directory / str(later)).rename(target)
        logging.warning(
          "Moved the unrestorable checkpoint of step %d to %s; training continues from step %d.", later, target, step
        )
    multihost_utils.sync_global_devices("flax_detector_checkpoints_set_aside")
    self._manager.reload()

  def restore(
    self, step: int, abstract_state: Any, make_data_iterator: Callable[[int], grain.DatasetIterator]
  ) -> tuple[Any, grain.DatasetIterator]:
    """Restores the state at `step` onto the shardings in `abstract_state`, and its data iterator."""
    self._check_fits(step, abstract_state)
    unusable_iterator = self._why_iterator_unusable(step)
    if unusable_iterator:
      logging.info("%s: positioning the data iterator at step %d (same data order).", unusable_iterator, step)
      state = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)})
      )[_STATE]
      return state, make_data_iterator(step)
    data_iterator = make_data_iterator(0)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(abstract_state), _DATA: grain.checkpoint.CheckpointRestore(data_iterator)}
        ),
      )
    except BaseException:
      data_iterator.close()  # its worker processes may have started
      raise
    return restored[_STATE], data_iterator

  def _why_iterator_unusable(self, step: int) -> str | None:
    """Why this run cannot restore the data iterator state saved with `step`, or None when it can."""
    if not (self.directory / str(step) / _DATA).exists():
      return f"Checkpoint {step} holds no data iterator (its weights were imported)"
    saved_topology = Topology(
      **self._manager.restore(step, args=ocp.args.Composite(**{_TOPOLOGY: ocp.args.JsonRestore()}))[_TOPOLOGY]
    )
    if saved_topology != self._topology:
      return f"Checkpoint {step} was written by {saved_topology}, this run is {self._topology}"
    return None

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Compares array names and shapes with the checkpoint's metadata before reading any array."""
    saved = _shapes_by_name(self._manager.item_metadata(step)[_STATE])
    expected = _shapes_by_name(abstract_state)
    differences = [
      f"{name}: saved {saved.get(name)}, config needs {expected.get(name)}"
      for name in sorted(set(saved) | set(expected))
      if saved.get(name) != expected.get(name)
    ]
    if differences:
      raise CheckpointMismatchError(
        f"{self.directory / str(step)}: this checkpoint does not fit the model and optimizer of the current config "
        f"({len(differences)} arrays differ, e.g. {'; '.join(differences[:3])}). Resume with the config it was "
        f"trained with (see config.json in the workdir) or use a new --workdir."
      )

  def wait_until_finished(self) -> None:
    """Blocks until the pending save is written; raises CheckpointWriteError naming its step if it failed."""
    with self._writing(self._pending_step):
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    self._pending_step = None

  def close(self) -> None:
    """Waits for pending saves and surfaces their errors, unless a write error was already raised."""
    if self._failed:
      return  # the manager would re-raise the same error on the way out of the failed run
    with self._writing(self._pending_step):
      self._manager.close()

  @contextlib.contextmanager
  def _writing(self, step: int | None) -> Iterator[None]:
    """Turns an OSError from writing checkpoint `step` into one CheckpointWriteError."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except -- Orbax may wrap the OSError
      cause = _os_error_in(error)
      if cause is None:
        raise
      self._failed = True
      where = f"at step {step}" if step is not None else "in progress"
      raise CheckpointWriteError(
        f"checkpoint {where} could not be written: {cause.strerror or cause} ({cause.filename or self.directory}). "
        f"Earlier checkpoints in {self.directory} are intact; free space or fix permissions, then run the "
        f"same command again to resume."
      ) from error

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _os_error_in(error: BaseException) -> OSError | None:
  """The OSError that caused `error` (itself, or one it was raised from), if any."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError):
      return error
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def save_imported_state(directory: epath.PathLike, state: Any) -> None:
  """Writes `state` as checkpoint 0 with no data iterator: weights imported from elsewhere, before any training.

  Inference reads it like any checkpoint; training resumes from it at step 0 with a fresh data iterator.
  """
  manager = ocp.CheckpointManager(
    workdir.absolute(directory), item_names=(_STATE, _DATA, _TOPOLOGY), item_handlers=_item_handlers()
  )
  try:
    manager.save(0, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state)}))
  finally:
    manager.close()


def remove_partial_saves(directory: epath.Path) -> None:
  """Deletes folders of saves that never finished (the run died mid-write); Orbax would never read them.

  Call from one process only, before any process creates a manager for `directory`.
  """
  if not directory.exists():
    return
  for partial in directory.glob(_PARTIAL_SAVE):
    logging.warning("Removing %s: a checkpoint save that never finished.", partial)
    if workdir.is_url(partial):
      partial.rmtree()
    else:
      shutil.rmtree(partial, ignore_errors=True)


def _one_line(error: BaseException) -> str:
  """The error's type and first line, without TensorStore's long spec, for a one-line warning."""
  text = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
  return f"{type(error).__name__}: {text[:240]}"


def newest_restorable(
  manager: ocp.CheckpointManager, directory: epath.Path, restore_step: Callable[[int], _T]
) -> tuple[_T, int]:
  """(restore_step(step), step) for the newest step that restores; each newer one gets one warning line.

  A checkpoint that does not fit the config is not skipped: older ones would not fit either.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_step(step), step
    except CheckpointMismatchError:
      raise
    except Exception as error:  # pylint: disable=broad-except -- any unreadable checkpoint is skipped
      logging.warning(
        "Checkpoint step %d in %s cannot be restored (%s); trying the next older one.",
        step,
        directory,
        _one_line(error),
      )
      failures.append(f"step {step}: {_one_line(error)}")
  raise NoUsableCheckpointError(
    f"No checkpoint in {directory} can be restored ({'; '.join(failures) or 'none found'}). Train afresh with a "
    f"new --workdir, or delete {directory} to start over in this one."
  )


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/Conv_0/kernel": shape, ...} for a state pytree or Orbax's metadata of one."""

  def name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))

  return {
    "/".join(name(entry) for entry in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that tell Orbax where each restored array goes."""
  return jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract_state, shardings
  )


def restore_model_variables(
  directory: epath.PathLike, abstract_variables: Any, step: int | None = None
) -> tuple[Any, int]:
  """Restores only {"params", "batch_stats"} of a saved train state (no optimizer state), for inference.

  Returns (variables, step); `step` None means the newest checkpoint that restores (newer unreadable
  ones are skipped with a warning, as in training).
  """
  directory = workdir.absolute(directory)
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)  # no warnings
  manager = ocp.CheckpointManager(
    directory,
    item_names=(_STATE, _DATA, _TOPOLOGY),
    options=options,
    item_handlers={
      _STATE: ocp.PyTreeCheckpointHandler(),
      _DATA: grain.checkpoint.CheckpointHandler(),
      _TOPOLOGY: ocp.JsonCheckpointHandler(),
    },
  )
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)

  def restore_step(step: int) -> Any:
    return manager.restore(
      step,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.PyTreeRestore(item=abstract_variables, restore_args=restore_args, partial_restore=True)}
      ),
    )[_STATE]

  try:
    if step is not None:
      return restore_step(step), step
    if not manager.all_steps():
      raise NoUsableCheckpointError(f"{directory}: no checkpoint found; train first with flax_detector.main")
    return newest_restorable(manager, directory, restore_step)
  finally:
    manager.close()
