"""Which of JAX's, Orbax's and Grain's log lines reach a command's stderr without --verbose.

Those libraries log dozens of INFO lines per checkpoint, compilation or restore, and JAX probes for a
TPU library on every machine ("Unable to initialize backend 'tpu': ... libtpu.so"): a person reading a
run's log or a command's output should see the project's own lines and the libraries' real problems.
"""

import logging

from absl import logging as absl_logging

_LIBRARIES = ("/jax/", "/jaxlib/", "/orbax/", "/grain/")


class LibraryFilter(logging.Filter):
  """Drops the libraries' records below `keep_from`, and Orbax's tracebacks of an OSError at any level.

  Orbax logs the traceback of an OSError in a background save and the error is raised again at the next
  save or wait, where the command reports it in one line (checkpoint.CheckpointWriteError).
  """

  def __init__(self, keep_from: int):
    super().__init__()
    self._keep_from = keep_from

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" in record.pathname and record.exc_info and isinstance(record.exc_info[1], OSError):
      return False
    return record.levelno >= self._keep_from or not any(part in record.pathname for part in _LIBRARIES)


def hide_library_logs(keep_from: int) -> None:
  """`keep_from` is a level of the standard `logging` module (absl's constants number levels otherwise).

  On absl's handler, not on a logger: the libraries' own loggers propagate their records to it.
  """
  absl_logging.get_absl_handler().addFilter(LibraryFilter(keep_from))
