"""A trained detector for inference: restored variables, one compiled scoring function, batched streaming.

`predict` and `evaluate` both score images outside any training run; both go through `Detector`, so
they restore, preprocess (the run's crop side, eval grid and preprocess mode from its config.json) and
calibrate exactly alike, and both compile one function for a fixed batch shape however many images
they stream through it. Explaining (Grad-CAM) uses a second compiled function that returns the same
scores together with the maps, so a command that explains still runs the model once per batch.
"""

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from flax_detector import gradcam, library_logs, preprocess, report, sharding
from flax_detector import workdir as workdir_layout
from flax_detector.checkpoint import abstract_with_shardings, restore_model_variables
from flax_detector.models import create_model, init_variables, view_averaged_log_probs

Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class Detector:
  """A restored run: its config, variables, calibration and the jitted view-averaged log-probabilities."""

  config: ml_collections.ConfigDict
  step: int
  calibration: report.Calibration
  batch_size: int
  _variables: Any
  _log_probs: Callable[[Any, jax.Array], jax.Array]
  _explained_log_probs: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  _batch_sharding: jax.sharding.NamedSharding

  @property
  def class_names(self) -> list[str]:
    return list(self.config.data.class_names)

  @property
  def positive(self) -> int:
    return self.class_names.index(self.config.data.positive_class)

  @property
  def decoded_side(self) -> int | None:
    """The shorter side to decode images to (preprocess.decoded_side): None keeps every native pixel."""
    return preprocess.decoded_side(self.config.image_size, self.config.data.preprocess)

  def views(self, image: np.ndarray) -> np.ndarray:
    """The evaluation views of an image decoded at decoded_side, as training evaluated: uint8[V, S, S, 3]."""
    data = self.config.data
    return preprocess.eval_transform(image, self.config.image_size, data.preprocess, data.get("eval_grid", 1))

  def log_probs(self, views: Sequence[np.ndarray]) -> np.ndarray:
    """Uncalibrated log-probabilities float32[n, classes] of up to batch_size images' views."""
    output = self._log_probs(self._variables, self._device_batch(views))
    return np.asarray(output)[: len(views)]

  def explain(self, views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """log_probs' output and each view's Grad-CAM float32[n, V, h, w] (gradcam.py), from one compiled call."""
    log_probs, cams = self._explained_log_probs(self._variables, self._device_batch(views))
    return np.asarray(log_probs)[: len(views)], np.asarray(cams)[: len(views)]

  def heatmap(self, view_cams: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """float32[H, W]: an image's Grad-CAM, its views' maps (from `explain`) placed where `views` cut them."""
    data = self.config.data
    return gradcam.image_heatmap(
      view_cams, image_shape, self.config.image_size, data.preprocess, data.get("eval_grid", 1)
    )

  def _device_batch(self, views: Sequence[np.ndarray]) -> jax.Array:
    """The views padded with blank images to the compiled batch size, on the mesh."""
    batch = np.zeros((self.batch_size,) + views[0].shape, np.uint8)
    batch[: len(views)] = np.stack(views)
    return jax.device_put(batch, self._batch_sharding)


def load_detector(workdir: epath.PathLike, batch_size: int | None = None) -> Detector:
  """Restores the newest usable checkpoint of a run for inference (no optimizer state)."""
  workdir = epath.Path(workdir)
  config = workdir_layout.load_config(workdir)
  model = create_model(config.model, len(config.data.class_names))
  mesh = sharding.create_mesh()
  variables_shape = jax.eval_shape(lambda: init_variables(model, config.image_size, jax.random.PRNGKey(0)))
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), variables_shape)
  variables, step = restore_model_variables(
    workdir / workdir_layout.CHECKPOINTS, abstract_with_shardings(variables_shape, replicated)
  )
  logging.info("Loaded checkpoint step %d from %s", step, workdir)
  return build_detector(config, variables, step, report.load_calibration(workdir), mesh, batch_size)


def build_detector(
  config: ml_collections.ConfigDict,
  variables: Any,
  step: int,
  calibration: report.Calibration,
  mesh: jax.sharding.Mesh,
  batch_size: int | None = None,
) -> Detector:
  """A Detector over given variables (restored, or built by hand in a test), compiled lazily on first use."""
  model = create_model(config.model, len(config.data.class_names))
  batch_size = batch_size or config.eval_batch_size
  sharding.check_divisible(batch_size, "--batch_size", mesh)
  positive = list(config.data.class_names).index(config.data.positive_class)

  # Variables are an argument, not a closure: as constants they would be baked into the program.
  @jax.jit
  def log_probs(variables: Any, images: jax.Array) -> jax.Array:
    return view_averaged_log_probs(model.apply, variables, images)

  @jax.jit
  def explained_log_probs(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gradcam.explained_log_probs(model.apply, variables, images, positive)

  return Detector(
    config=config,
    step=step,
    calibration=calibration,
    batch_size=batch_size,
    _variables=variables,
    _log_probs=log_probs,
    _explained_log_probs=explained_log_probs,
    _batch_sharding=sharding.batch_sharding(mesh),
  )


def quiet_library_logs() -> None:
  """Commands whose stdout or report is the product show only their own warnings, unless --verbose."""
  library_logs.hide_library_logs(keep_from=logging.logging.ERROR)
  logging.set_verbosity(logging.WARNING)


class Progress:
  """A progress line on stderr: done/total, images/s and time left; redrawn in place on a terminal."""

  def __init__(self, label: str, total: int, stream: Any = None):
    self._label, self._total, self._done = label, total, 0
    self._stream = stream or sys.stderr
    self._start = self._last = time.monotonic()
    self._interactive = self._stream.isatty()

  def advance(self, count: int) -> None:
    self._done += count
    now = time.monotonic()
    if now - self._last >= (0.25 if self._interactive else 10.0) or self._done >= self._total:
      self._last = now
      rate = self._done / max(now - self._start, 1e-9)
      left = (self._total - self._done) / rate if rate else 0.0
      line = f"{self._label}: {self._done}/{self._total} images, {rate:.1f} images/s, {left:.0f} s left"
      self._stream.write(f"\r{line}\033[K" if self._interactive else f"{line}\n")
      self._stream.flush()

  def finish(self) -> float:
    """Ends the line and returns images per second over the whole run."""
    elapsed = time.monotonic() - self._start
    if self._interactive:
      self._stream.write("\n")
    return self._done / max(elapsed, 1e-9)


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
  """The items that loaded, with their scores (and, when explaining, their images and Grad-CAMs)."""

  items: list[Any]
  log_probs: np.ndarray
  images: list[np.ndarray] | None  # kept only when explaining: an overlay needs the image, a score does not
  view_cams: np.ndarray | None


def stream_scores(
  detector: Detector,
  items: Sequence[Item],
  load_image: Callable[[Item], np.ndarray | None],
  label: str,
  explain: bool = False,
) -> Iterator[ScoredBatch]:
  """Scores per batch; the next batch decodes (and is cut into views) while this one runs.

  `load_image(item)` returns the decoded image, or None (after saying why) to leave it out. With
  `explain`, each batch also carries its views' Grad-CAMs, from the same compiled call as the scores.
  """
  progress = Progress(label, len(items))
  chunks = [items[start : start + detector.batch_size] for start in range(0, len(items), detector.batch_size)]

  def load(item: Item) -> tuple[np.ndarray | None, np.ndarray] | None:
    image = load_image(item)
    return None if image is None else (image if explain else None, detector.views(image))

  with futures.ThreadPoolExecutor() as pool:
    submitted = [[pool.submit(load, item) for item in chunk] for chunk in chunks[:1]]
    for index, chunk in enumerate(chunks):
      if index + 1 < len(chunks):
        submitted.append([pool.submit(load, item) for item in chunks[index + 1]])
      loaded = [future.result() for future in submitted.pop(0)]
      kept = [(item, pair) for item, pair in zip(chunk, loaded) if pair is not None]
      if kept:
        views = [views for _, (_, views) in kept]
        if explain:
          log_probs, view_cams = detector.explain(views)
          yield ScoredBatch([item for item, _ in kept], log_probs, [image for _, (image, _) in kept], view_cams)
        else:
          yield ScoredBatch([item for item, _ in kept], detector.log_probs(views), None, None)
      progress.advance(len(chunk))
  rate = progress.finish()
  logging.info("%s: %d images at %.1f images/s", label, len(items), rate)
