"""One training run per workdir: a second run would interleave checkpoints and corrupt the first.

The lock is `fcntl.flock` on DIR/run.lock, an OS lock the kernel releases when its holder dies however
it dies (kill -9 included), so a crashed run never leaves the workdir stuck. The file holds a JSON of
the owner (pid, host, start time, command) for the message the second run prints; it is never
deleted, since deleting a lock file races with a process that has just opened it.

Multi-process jobs: every process of a job locks its own file (process 0 DIR/run.lock, process i
DIR/run.lock.process_i), so a second job fails on every host at once instead of leaving its other
processes waiting on a coordinator that has exited. Remote workdirs (gs://...) cannot be flocked and
are used without a lock (logged).
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

from absl import logging
from etils import epath

from flax_detector import errors
from flax_detector import workdir as workdir_module


class WorkdirInUseError(errors.UserError):
  """Another live process holds the workdir's lock."""


def lock_path(workdir: epath.PathLike, process_index: int) -> epath.Path:
  name = workdir_module.RUN_LOCK if process_index == 0 else f"{workdir_module.RUN_LOCK}.process_{process_index}"
  return workdir_module.absolute(workdir) / name


def _owner() -> dict[str, object]:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "command": " ".join(sys.argv),
    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }


def _describe_owner(path: epath.Path) -> str:
  try:
    owner = json.loads(path.read_text())
    return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {owner['command']}"
  except (OSError, ValueError, KeyError):  # the owner is between taking the lock and writing the file
    return "owner not recorded yet"


@contextlib.contextmanager
def hold(workdir: epath.PathLike, process_index: int = 0) -> Iterator[None]:
  """Holds the workdir's lock for the `with` block; raises WorkdirInUseError at once if it is taken."""
  if workdir_module.is_url(workdir):
    logging.info("%s is remote and cannot be locked: make sure no other run uses it.", workdir)
    yield
    return
  path = lock_path(workdir, process_index)
  path.parent.mkdir(parents=True, exist_ok=True)
  descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Grain's worker processes
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirInUseError(
        f"--workdir={workdir} is in use by another run ({_describe_owner(path)}). Wait for it to finish, "
        f"stop it, or use another --workdir."
      ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, (json.dumps(_owner()) + "\n").encode())
    yield
  finally:
    os.close(descriptor)  # releases the lock
