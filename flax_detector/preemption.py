"""Stopping on preemption at a step every host agrees on, with a checkpoint, instead of dying mid-step."""

import signal
import threading
import types
from typing import Any

import jax
from absl import logging

from flax_detector.checkpoint import Checkpointer


class PreemptionGuard:
  """Answers "should training stop after this step?" the same way on every host.

  Multi-process jobs: JAX's distributed runtime catches SIGTERM on any host and its preemption sync
  point (read through Orbax's `reached_preemption`) turns True at the same step on all of them.
  Single-process runs have no such runtime, so a SIGTERM handler sets a flag for the loop to read.
  Use as a context manager: the previous SIGTERM handler is restored on exit.
  """

  def __init__(self, checkpointer: Checkpointer):
    self._checkpointer = checkpointer
    self._sigterm = threading.Event()
    self._previous_handler: Any = None

  def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after the current step, then exiting.")
    self._sigterm.set()

  def __enter__(self) -> "PreemptionGuard":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def should_stop(self, step: int) -> bool:
    """Call on every host after every step."""
    return self._checkpointer.reached_preemption(step) or self._sigterm.is_set()
