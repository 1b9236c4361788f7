import logging
import sys

import pytest

from flax_detector.library_logs import LibraryFilter

SITE = "/venv/lib/python3.11/site-packages"


def _record(pathname: str, level: int, message: str = "note", error: BaseException | None = None) -> logging.LogRecord:
  exc_info = None
  if error is not None:
    try:
      raise error
    except type(error):
      exc_info = sys.exc_info()
  return logging.LogRecord("any", level, pathname, 1, message, None, exc_info)


@pytest.mark.parametrize(
  "pathname",
  [
    f"{SITE}/jax/_src/xla_bridge.py",  # "Unable to initialize backend 'tpu': ... libtpu.so"
    f"{SITE}/jaxlib/xla_client.py",
    f"{SITE}/orbax/checkpoint/checkpoint_manager.py",
    f"{SITE}/grain/_src/python/dataset/dataset.py",
  ],
)
def test_library_records_pass_only_from_the_kept_level(pathname):
  trainer, command = LibraryFilter(keep_from=logging.WARNING), LibraryFilter(keep_from=logging.ERROR)
  assert not trainer.filter(_record(pathname, logging.INFO))
  assert trainer.filter(_record(pathname, logging.WARNING))
  assert not command.filter(_record(pathname, logging.WARNING))
  assert command.filter(_record(pathname, logging.ERROR))


def test_the_projects_own_records_always_pass():
  for level in (logging.DEBUG, logging.INFO, logging.WARNING):
    assert LibraryFilter(keep_from=logging.ERROR).filter(_record("/work/flax_detector/train.py", level))


def test_orbax_tracebacks_of_an_os_error_are_dropped_at_any_level():
  orbax = f"{SITE}/orbax/checkpoint/_src/checkpointers/async_checkpointer.py"
  full_disk = OSError(28, "No space left on device")
  assert not LibraryFilter(keep_from=logging.WARNING).filter(_record(orbax, logging.ERROR, error=full_disk))
  assert LibraryFilter(keep_from=logging.WARNING).filter(_record(orbax, logging.ERROR, error=ValueError("bug")))
