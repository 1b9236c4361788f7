"""Training and evaluation: the train state, the jitted steps, and the loop that drives them."""

import contextlib
import dataclasses
import functools
import itertools
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax.training import train_state

from flax_detector import (
  audit,
  config_validation,
  errors,
  finetune,
  input_pipeline,
  losses,
  memory_guard,
  metrics,
  report,
  report_figures,
  sharding,
  shared_memory_release,
)
from flax_detector import workdir as workdir_module
from flax_detector.checkpoint import Checkpointer, Topology, abstract_with_shardings
from flax_detector.data.folder import skipped_lines
from flax_detector.data.sources import class_counts
from flax_detector.models import average_view_log_probs, create_model, init_variables
from flax_detector.preemption import PreemptionGuard


class TrainState(train_state.TrainState):
  """Params, optimizer state, BatchNorm statistics and the key dropout keys are folded from."""

  batch_stats: Any
  dropout_key: jax.Array


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int
) -> optax.Schedule:
  """Linear warm-up to config.learning_rate, then cosine decay to 0 at the last scheduled step."""
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
    0.0, config.learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), end_value=0.0
  )


def _decay_mask(params: Any) -> Any:
  """Weight decay on conv and dense kernels only, never on biases or BatchNorm scales."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm written as one factor, min(1, max_norm / norm), multiplied into every gradient.

  optax computes select(norm < max_norm, g, g / norm * max_norm). XLA's CPU backend then writes g / norm
  out as an array of its own, and both Adam moments read g and that copy: three extra passes over every
  gradient. For the first Dense layer's 103M weights, the update takes 277 ms instead of 160 ms on the
  2-core CPU (benchmarks/RESULTS.md). Unclipped gradients are the same bitwise: the factor is exactly 1.
  Clipped ones differ from optax's only by float rounding. This is torch.nn.utils.clip_grad_norm_'s form too.
  The state is optax's (empty), so checkpoints are unchanged.
  """

  def update(updates: Any, state: optax.ClipByGlobalNormState, params: Any = None) -> tuple[Any, Any]:
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.ClipByGlobalNormState(), update)


def create_optimizer(
  config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  """AdamW, clipped by global norm; with config.freeze, over the trained parameters only (norm included)."""
  adamw = optax.adamw(learning_rate_fn, weight_decay=config.weight_decay, mask=_decay_mask)
  if config.grad_clip_norm > 0:
    adamw = optax.chain(clip_by_global_norm(config.grad_clip_norm), adamw)
  return finetune.apply_freeze(adamw, config.freeze)


def create_train_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  optimizer: optax.GradientTransformation,
  variables: dict[str, Any] | None = None,
) -> TrainState:
  """Initialises the model from config.seed; pure, so it can run under jax.eval_shape or jit.

  `model` and `optimizer` are built once by the caller: they are static parts of the state's
  pytree structure, which the shardings computed from an abstract state must match. `variables`
  ({"params", "batch_stats"}, e.g. imported weights) replace the initialisation; the optimizer
  state and dropout key are the same as a fresh run's.
  """
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
  if variables is None:
    variables = init_variables(model, config.image_size, init_key)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    dropout_key=dropout_key,
    tx=optimizer,
  )


def train_step(
  state: TrainState, batch: dict[str, jax.Array], *, class_weights: np.ndarray
) -> tuple[TrainState, metrics.TrainMetrics]:
  """One AdamW step on the class-weighted cross-entropy of a global batch."""
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"],
      train=True,
      rngs={"dropout": dropout_key},
      mutable=["batch_stats"],
    )
    loss, per_example_loss, example_weight = losses.weighted_cross_entropy(
      logits, batch["label"], jnp.asarray(class_weights), batch["mask"]
    )
    return loss, (logits, per_example_loss, example_weight, updates.get("batch_stats", {}))

  grads, (logits, per_example_loss, example_weight, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  step_metrics = metrics.TrainMetrics.single_from_model_output(
    logits=logits,
    labels=batch["label"],
    mask=batch["mask"],
    per_example_loss=per_example_loss,
    example_weight=example_weight,
  )
  return new_state, step_metrics


def eval_logits(state: TrainState, images: jax.Array) -> jax.Array:
  """float32[b, classes] logits of one view of each image of a global eval batch, uint8[b, S, S, 3]."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)


def eval_metrics(
  view_logits: tuple[jax.Array, ...], labels: jax.Array, mask: jax.Array, *, class_weights: np.ndarray
) -> tuple[metrics.EvalMetrics, dict[str, jax.Array]]:
  """Metrics of a global eval batch, each image classified by its views' averaged log-probabilities.

  Also returns the per-example log-probabilities with their labels and mask, which the
  calibration and the report need; they are a few floats per image.
  """
  log_probs = average_view_log_probs(jnp.stack(view_logits, axis=1))
  _, per_example_loss, example_weight = losses.weighted_cross_entropy(
    log_probs, labels, jnp.asarray(class_weights), mask
  )
  batch_metrics = metrics.EvalMetrics.single_from_model_output(
    logits=log_probs,
    labels=labels,
    mask=mask,
    per_example_loss=per_example_loss,
    example_weight=example_weight,
  )
  return batch_metrics, {"log_probs": log_probs, "label": labels, "mask": mask}


def _split_views(images: jax.Array) -> tuple[jax.Array, ...]:
  """uint8[b, views, S, S, 3] as `views` arrays of uint8[b, S, S, 3], each split over the data axis like `images`."""
  return tuple(images[:, view] for view in range(images.shape[1]))


@dataclasses.dataclass(frozen=True)
class EvalStep:
  """Scores a global eval batch of [b, views, S, S, 3] through one compiled forward pass per view.

  The forward pass is compiled for one view of the batch, [b, S, S, 3], whatever the grid: periodic
  validation (1 view), the final test and the calibration (eval_grid**2 views) share one compiled
  program instead of compiling the network once per grid, and b crops per call run as fast per crop
  on a CPU as b * views. Only the small view split and the metrics compile per grid.
  """

  logits: Callable[[TrainState, jax.Array], jax.Array]
  metrics: Callable[..., tuple[metrics.EvalMetrics, dict[str, jax.Array]]]
  split_views: Callable[[jax.Array], tuple[jax.Array, ...]]

  def __call__(
    self, state: TrainState, batch: dict[str, jax.Array]
  ) -> tuple[metrics.EvalMetrics, dict[str, jax.Array]]:
    view_logits = tuple(self.logits(state, view) for view in self.split_views(batch["image"]))
    return self.metrics(view_logits, batch["label"], batch["mask"])


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per-example view-averaged log-probabilities of a split, in record order, unreadable records dropped."""

  log_probs: np.ndarray  # float32[n, classes]
  labels: np.ndarray  # int32[n]


class Evaluator:
  """Scores a planned sequence of split passes through one set of Grain worker processes.

  Starting workers costs about a second, more than scoring a small validation split on a CPU, and
  they start lazily, at the first batch asked for. So the first batch is asked for on a thread as
  soon as the Evaluator exists (the workers start while training is still being set up), and one
  iterator runs over every planned pass: each call scores the next pass. With `reuse`, the passes
  repeat without end, so every periodic evaluation sees the same batches in the same order and the
  workers prepare the next evaluation's first batches while training goes on.
  """

  def __init__(
    self,
    eval_step: EvalStep,
    passes: Sequence[grain.MapDataset],
    data: ml_collections.ConfigDict,
    batch_sharding: jax.sharding.NamedSharding,
    *,
    reuse: bool,
  ):
    self._eval_step, self._batch_sharding = eval_step, batch_sharding
    lengths = [len(dataset) for dataset in passes]
    self._pass_lengths = itertools.cycle(lengths) if reuse else iter(lengths)
    self._positive_index = list(data.class_names).index(data.positive_class)
    dataset = grain.MapDataset.concatenate(list(passes))
    self._iterator = input_pipeline.make_iterator(
      dataset.repeat(None) if reuse else dataset, data.worker_count, data.worker_buffer_size
    )
    self._starter = futures.ThreadPoolExecutor(max_workers=1)
    self._first_batch: futures.Future | None = self._starter.submit(next, self._iterator)

  def _next_batch(self) -> dict[str, np.ndarray]:
    if self._first_batch is None:
      return next(self._iterator)
    first, self._first_batch = self._first_batch.result(), None
    return first

  def __call__(self, state: TrainState) -> tuple[dict[str, Any], Scores]:
    """Runs the next planned pass through the eval step; every example of its split counts exactly once."""
    num_batches = next(self._pass_lengths, None)
    if num_batches is None:
      raise RuntimeError("this Evaluator has scored every pass it was planned with")
    accumulated = None
    collected: list[dict[str, jax.Array]] = []
    for _ in range(num_batches):
      global_batch = sharding.to_global_batch(self._next_batch(), self._batch_sharding)
      batch_metrics, batch_scores = self._eval_step(state, global_batch)
      accumulated = batch_metrics if accumulated is None else accumulated.merge(batch_metrics)
      collected.append(batch_scores)
    host = {name: np.concatenate([np.asarray(scores[name]) for scores in collected]) for name in collected[0]}
    keep = host["mask"]
    return metrics.summarize_eval(accumulated, self._positive_index), Scores(
      host["log_probs"][keep], host["label"][keep]
    )

  def close(self) -> None:
    if self._first_batch is not None:
      futures.wait([self._first_batch])  # the workers it may be starting are then closed with the iterator
    self._starter.shutdown()
    self._iterator.close()
    shared_memory_release.release_finished_passes()


def _interval_steps(setting: int, steps_per_epoch: float) -> int:
  """A step interval from a config field where <= 0 means once per epoch."""
  return setting if setting > 0 else max(1, round(steps_per_epoch))


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run derives from its config before training: data, schedule, state layout, steps."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  splits: input_pipeline.Splits
  total_steps: int  # the schedule's length: input_pipeline.Schedule.epochs passes over the training split
  last_step: int  # where this run stops: total_steps, or num_train_steps when that is smaller
  steps_per_epoch: float
  learning_rate_fn: optax.Schedule
  init_state: Callable[[], TrainState]
  abstract_state: TrainState
  state_shardings: Any
  train_step: Callable[..., tuple[TrainState, metrics.TrainMetrics]]
  eval_step: EvalStep

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)

  def evaluator(self, splits: Sequence[input_pipeline.ImageSource], *, grid: int, reuse: bool) -> Evaluator:
    """An Evaluator of one pass per split, in order, with grid x grid views per image; close it when done."""
    settings = dataclasses.replace(input_pipeline.EvalSettings.from_config(self.config), grid=grid)
    passes = [
      input_pipeline.eval_dataset(split, settings, jax.process_index(), jax.process_count()) for split in splits
    ]
    return Evaluator(self.eval_step, passes, self.config.data, self.batch_sharding, reuse=reuse)


def _with_crop_size(config: ml_collections.ConfigDict, splits: input_pipeline.Splits) -> ml_collections.ConfigDict:
  """The config with image_size set to the crop side this folder supports (see data.crop_policy).

  config.json records the result, so predict and evaluate crop exactly as training did.
  """
  data = config.data
  size = input_pipeline.crop_size(
    splits.train, config.image_size, data.preprocess, data.crop_policy, data.shared_crop_quantile
  )
  if size == config.image_size:
    return config
  logging.warning(
    "Crops of %d px instead of image_size=%d: %.0f%% of the training images are smaller than %d px "
    "and would be zero-padded (data.crop_policy=shared keeps padding from marking a class; "
    "set --config.data.crop_policy=pad to pad them instead).",
    size,
    config.image_size,
    100 * np.mean(np.min(splits.train.sizes, axis=1) < config.image_size),
    config.image_size,
  )
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.image_size = size
  return resolved


def state_initializer(
  config: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int
) -> tuple[optax.Schedule, Callable[[], TrainState]]:
  """The learning-rate schedule and the function that creates the initial TrainState of `config`'s model."""
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
  model = create_model(config.model, len(config.data.class_names), frozen_features=config.freeze == "features")
  optimizer = create_optimizer(config, learning_rate_fn)
  return learning_rate_fn, functools.partial(create_train_state, config, model, optimizer)


def jit_train_step(
  class_weights: np.ndarray, state_shardings: Any, mesh: jax.sharding.Mesh
) -> Callable[..., tuple[TrainState, metrics.TrainMetrics]]:
  """train_step jitted over `mesh`: the batch split over its data axis, metrics replicated, the state donated."""
  return jax.jit(
    functools.partial(train_step, class_weights=class_weights),
    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def build_experiment(config: ml_collections.ConfigDict, workdir: epath.Path | None = None) -> Experiment:
  """Everything before the first step, from a config that config_validation.validate returned."""
  mesh = sharding.create_mesh()
  splits = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config), workdir, jax.process_index())
  config = _with_crop_size(config, splits)
  num_classes = len(config.data.class_names)
  counts = class_counts(splits.train, num_classes)
  class_weights = losses.class_weights(config_validation.parse_class_weights(config.class_weights, num_classes), counts)
  logging.info("Class weights %s from training counts %s", class_weights.tolist(), counts.tolist())

  schedule = input_pipeline.Schedule.from_config(config)
  total_steps, epochs = schedule.steps(len(splits.train)), schedule.epochs(len(splits.train))
  if epochs > config.num_epochs:
    logging.info(
      "%d epochs instead of num_epochs=%d, so the schedule spans min_train_steps=%d steps on %d images",
      epochs,
      config.num_epochs,
      config.min_train_steps,
      len(splits.train),
    )
  steps_per_epoch = total_steps / epochs
  last_step = min(total_steps, config.num_train_steps) if config.num_train_steps > 0 else total_steps
  learning_rate_fn, init_state = state_initializer(config, steps_per_epoch, total_steps)
  abstract_state = jax.eval_shape(init_state)
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.sharding)
  memory_guard.check_train_step(
    config.image_size,
    config.batch_size // jax.process_count(),
    config.model.width_multiplier,
    config.model.batch_norm,
    config.model.dtype,
    sharding.bytes_per_device(abstract_state.params, state_shardings.params),
  )
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return Experiment(
    config=config,
    mesh=mesh,
    splits=splits,
    total_steps=total_steps,
    last_step=last_step,
    steps_per_epoch=steps_per_epoch,
    learning_rate_fn=learning_rate_fn,
    init_state=init_state,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    train_step=jit_train_step(class_weights, state_shardings, mesh),
    eval_step=EvalStep(
      logits=jax.jit(eval_logits, in_shardings=(state_shardings, batch_sharding), out_shardings=batch_sharding),
      metrics=jax.jit(
        functools.partial(eval_metrics, class_weights=class_weights),
        in_shardings=(batch_sharding, batch_sharding, batch_sharding),
        out_shardings=(replicated, replicated),
      ),
      split_views=jax.jit(_split_views, in_shardings=batch_sharding, out_shardings=batch_sharding),
    ),
  )


def _restore_or_initialize(
  experiment: Experiment, checkpointer: Checkpointer
) -> tuple[TrainState, grain.DatasetIterator]:
  """The newest restorable checkpoint's state and data position, or a fresh state at step 0."""
  config = experiment.config
  train_data = input_pipeline.train_dataset(
    experiment.splits.train, input_pipeline.TrainSettings.from_config(config), jax.process_index(), jax.process_count()
  )

  def make_train_iterator(start_step: int) -> grain.DatasetIterator:
    return input_pipeline.make_iterator(
      train_data, config.data.worker_count, config.data.worker_buffer_size, start_step
    )

  restored = checkpointer.restore_latest(
    abstract_with_shardings(experiment.abstract_state, experiment.state_shardings), make_train_iterator
  )
  if restored is not None:
    return restored
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  if config.init_from:
    state = finetune.start_from_init_from(state, config)
  return state, make_train_iterator(0)


def _log_start(
  experiment: Experiment, state: TrainState, workdir: epath.Path, writer: metric_writers.MetricWriter
) -> None:
  config, abstract, shardings = experiment.config, experiment.abstract_state, experiment.state_shardings
  logging.info(
    "Training steps %d..%d of %d (%.1f steps per epoch) on %d devices; per-device memory (%s): "
    "parameters %.1f MiB, optimizer state %.1f MiB",
    int(state.step),
    experiment.last_step,
    experiment.total_steps,
    experiment.steps_per_epoch,
    experiment.mesh.size,
    config.sharding,
    sharding.bytes_per_device(abstract.params, shardings.params) / 2**20,
    sharding.bytes_per_device(abstract.opt_state, shardings.opt_state) / 2**20,
  )
  if jax.process_index() == 0:
    workdir_module.write_json(workdir / workdir_module.CONFIG, config.to_dict())
    (workdir / workdir_module.SKIPPED_FILES).write_text(
      "".join(f"{line}\n" for line in skipped_lines(experiment.splits.skipped))
    )
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)})


def _stop_if_not_finite(loss: float, first_step: int, step: int, checkpointer: Checkpointer) -> None:
  """Ends the run before a diverged state is evaluated or saved, so the newest checkpoint stays usable.

  Checked where the host reads the loss anyway (log steps) and before each save, never every step:
  reading a device value each step would make the host wait for the device.
  """
  if np.isfinite(loss):
    return
  raise errors.RunStoppedError(
    f"training loss is {loss} at step {step} (the mean over steps {first_step}..{step}); the run stopped "
    f"without saving this state. The newest checkpoint (step {checkpointer.latest_step()}) holds the last "
    f"finite one: lower learning_rate or check the data, then run again."
  )


def _train(
  experiment: Experiment,
  state: TrainState,
  train_iterator: grain.DatasetIterator,
  validation: Evaluator | None,
  checkpointer: Checkpointer,
  writer: metric_writers.MetricWriter,
) -> tuple[TrainState, bool, Scores | None]:
  """Runs steps up to experiment.last_step; returns (state, whether a preemption stopped it, scores).

  `validation` (None without a validation split) scores the validation split every eval_every_steps
  and at the last step; the scores are that last validation's (None when it did not run), which the
  calibration can reuse when they are at eval_grid.

  Raises errors.RunStoppedError when the training loss turns NaN or infinite.
  """
  config = experiment.config
  eval_every = _interval_steps(config.eval_every_steps, experiment.steps_per_epoch)
  report_progress = periodic_actions.ReportProgress(num_train_steps=experiment.last_step, writer=writer)
  train_metrics = None
  step = int(jax.device_get(state.step))
  unlogged_from = step + 1  # the first step train_metrics holds
  last_scores = None
  with PreemptionGuard(checkpointer) as preemption:
    while step < experiment.last_step:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.to_global_batch(next(train_iterator), experiment.batch_sharding)
        state, batch_metrics = experiment.train_step(state, batch)
      step += 1
      train_metrics = batch_metrics if train_metrics is None else train_metrics.merge(batch_metrics)
      report_progress(step, time.time())
      is_last = step == experiment.last_step
      if step % config.log_every_steps == 0 or is_last:
        scalars = {name: float(value) for name, value in jax.device_get(train_metrics.compute()).items()}
        scalars["learning_rate"] = float(experiment.learning_rate_fn(step - 1))
        writer.write_scalars(step, scalars)
        _stop_if_not_finite(scalars["train_loss"], unlogged_from, step, checkpointer)
        train_metrics, unlogged_from = None, step + 1
      if validation is not None and (step % eval_every == 0 or is_last):
        with report_progress.timed("eval"):
          start = time.monotonic()
          summary, scores = validation(state)
          last_scores = scores if is_last else None
          logging.info("Validation at step %d took %.1f s", step, time.monotonic() - start)
        writer.write_scalars(step, {k: v for k, v in summary.items() if k.startswith("eval_")})
      stop = preemption.should_stop(step)
      if checkpointer.will_save(step, force=stop or is_last):
        if train_metrics is not None:  # steps since the last log: never save a diverged state
          _stop_if_not_finite(
            float(jax.device_get(train_metrics.compute()["train_loss"])), unlogged_from, step, checkpointer
          )
        checkpointer.save(step, state, train_iterator, force=True)
      if stop:
        logging.warning("Preempted at step %d: checkpoint saved; run the same command again to resume.", step)
        return state, True, None
  return state, False, last_scores


def _audit_data(experiment: Experiment, workdir: epath.Path) -> None:
  """Checks before training whether file metadata alone separates the classes; warns loudly when it does."""
  folders, config = experiment.splits.folders, experiment.config
  if not folders:
    logging.info(
      "Shortcut audit skipped: it reads image files, and this run has none (synthetic or prepared data; "
      "run python -m flax_detector.audit on the original folder)."
    )
    return
  records = [
    audit.AuditRecord(split, int(label), info)
    for split, folder in folders.items()
    for info, label in zip(folder.infos, folder.labels)
  ]
  result = audit.audit_records(records, config.data.class_names, config.image_size)
  workdir_module.write_json(workdir / workdir_module.AUDIT, result)
  for line in audit.summary_lines(result):
    logging.info("Audit: %s", line)
  if result["shortcut"]:
    logging.warning("!" * 100)
    logging.warning(
      "SHORTCUT: file metadata alone predicts the class (%.2f vs chance %.2f): %s. A high test "
      "accuracy on this folder is not evidence of detecting generators; see %s and the overlap "
      "accuracy in flax_detector.evaluate's report.",
      result["metadata_accuracy"],
      result["chance_accuracy"],
      result["finding"],
      workdir / workdir_module.AUDIT,
    )
    logging.warning("!" * 100)


def _score_pass(
  evaluator: Evaluator, state: TrainState, split: input_pipeline.ImageSource, grid: int
) -> tuple[dict[str, Any], Scores]:
  """The evaluator's next pass, which scores `split` with grid x grid views, timed in the log."""
  start = time.monotonic()
  result = evaluator(state)
  logging.info("Scored %d images (%d views each) in %.1f s", len(split), grid**2, time.monotonic() - start)
  return result


def _calibrate(
  experiment: Experiment, state: TrainState, final_passes: Evaluator, validation_scores: Scores | None
) -> dict[str, Any]:
  """Temperature and threshold fitted on the validation split at data.eval_grid (never on test).

  `validation_scores` are those scores when training's last validation already computed them (its
  periodic_eval_grid is eval_grid); otherwise `final_passes` scores the validation split now.
  """
  config = experiment.config
  if not len(experiment.splits.validation):
    return {
      "temperature": 1.0,
      "threshold": 0.5,
      "fitted_on": "nothing: data.val_fraction=0 leaves no validation split, so scores are uncalibrated",
    }
  if validation_scores is None:
    _, validation_scores = _score_pass(final_passes, state, experiment.splits.validation, config.data.eval_grid)
  positive_index = list(config.data.class_names).index(config.data.positive_class)
  return report.fit_calibration(validation_scores.log_probs, validation_scores.labels, positive_index)


def _final_evaluation(
  experiment: Experiment,
  state: TrainState,
  final_passes: Evaluator,
  validation_scores: Scores | None,
  workdir: epath.Path,
  writer: metric_writers.MetricWriter,
) -> dict[str, Any]:
  """Test metrics, the calibration fitted on validation, and the test split's figures in TensorBoard.

  `final_passes` scores the test split, then (unless `validation_scores`, see _calibrate) the validation split.
  """
  config = experiment.config
  class_names = list(config.data.class_names)
  positive_index = class_names.index(config.data.positive_class)
  step = int(jax.device_get(state.step))
  final, test_scores = _score_pass(final_passes, state, experiment.splits.test, config.data.eval_grid)
  fitted_calibration = _calibrate(experiment, state, final_passes, validation_scores)
  fitted = report.Calibration(fitted_calibration["temperature"], fitted_calibration["threshold"])
  final.update(
    split="test",
    checkpoint_step=step,
    class_names=class_names,
    calibrated=report.summarize_scores(test_scores.log_probs, test_scores.labels, positive_index, fitted),
  )
  writer.write_scalars(step, {k.replace("eval_", "test_"): v for k, v in final.items() if k.startswith("eval_")})
  if jax.process_index() == 0:
    workdir_module.write_json(workdir / workdir_module.CALIBRATION, fitted_calibration)
    logging.info("Calibration on validation: %s", fitted_calibration)
    with tempfile.TemporaryDirectory() as figures:
      names = report.write_score_figures(
        epath.Path(figures),
        test_scores.log_probs,
        test_scores.labels,
        positive_index,
        class_names,
        fitted,
        final["calibrated"],
      )
      writer.write_images(
        step,
        {
          f"test/{name.removesuffix('.png')}": report_figures.figure_to_tensorboard_image(epath.Path(figures) / name)[
            None
          ]
          for name in names
        },
      )
  return final


def _create_writer(workdir: epath.Path, is_chief: bool) -> metric_writers.MetricWriter:
  """Process 0's writer writes TensorBoard events and log lines; the other processes' writers write nothing.

  So a job's logs hold each scalar once: clu's create_default_writer(just_logging=True) would log every
  scalar on every process.
  """
  if is_chief:
    return metric_writers.create_default_writer(workdir, asynchronous=True)
  return metric_writers.MultiWriter([])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains (resuming from the latest checkpoint in workdir), then evaluates the test split.

  Returns the final test metrics, also written to workdir/final_metrics.json by process 0, or None
  when a preemption stopped training after saving a checkpoint.
  """
  with errors.as_user_errors():  # before training, a ValueError or OSError names a setting, file or folder
    config = config_validation.validate(config)
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    experiment = build_experiment(config, workdir_path)
  is_chief = jax.process_index() == 0
  if is_chief:
    _audit_data(experiment, workdir_path)
  with contextlib.ExitStack() as cleanup:
    writer = _create_writer(workdir_path, is_chief)
    cleanup.callback(writer.close)
    checkpointer = cleanup.enter_context(
      Checkpointer(
        workdir_path / workdir_module.CHECKPOINTS,
        _interval_steps(config.checkpoint_every_steps, experiment.steps_per_epoch),
        config.max_checkpoints_to_keep,
        Topology(jax.process_count(), config.data.worker_count),
      )
    )
    state, train_iterator = _restore_or_initialize(experiment, checkpointer)
    # Training's inputs close when training ends, so their Grain workers (each about 0.33 GB of its own memory,
    # 0.76 GB resident, for the cpu preset) are gone before the final passes run, not idle beside them.
    with contextlib.ExitStack() as training_inputs:
      training_inputs.callback(train_iterator.close)
      _log_start(experiment, state, workdir_path, writer)
      validation, splits, data = None, experiment.splits, experiment.config.data
      if len(splits.validation):
        validation = training_inputs.enter_context(
          contextlib.closing(experiment.evaluator([splits.validation], grid=data.periodic_eval_grid, reuse=True))
        )
      # The calibration reuses training's last validation when that one scores at eval_grid and runs at all
      # (training has a step left to end on); otherwise the final passes score the validation split too.
      reuse_last_validation = (
        validation is not None
        and data.periodic_eval_grid == data.eval_grid
        and int(jax.device_get(state.step)) < experiment.last_step
      )
      # The test split, then (unless reused) the validation split: these workers too start now, while the
      # train step compiles, and have the first test batches ready when training ends.
      final_splits = [splits.test]
      if validation is not None and not reuse_last_validation:
        final_splits.append(splits.validation)
      final_passes = cleanup.enter_context(
        contextlib.closing(experiment.evaluator(final_splits, grid=data.eval_grid, reuse=False))
      )
      state, preempted, validation_scores = _train(experiment, state, train_iterator, validation, checkpointer, writer)
    if preempted:
      return None
    reused = validation_scores if reuse_last_validation else None
    final = _final_evaluation(experiment, state, final_passes, reused, workdir_path, writer)
    checkpointer.wait_until_finished()  # the checkpoint final_metrics.json names is on disk first
  if is_chief:
    workdir_module.write_json(workdir_path / workdir_module.FINAL_METRICS, final)
    logging.info("Test metrics at step %d: %s", final["checkpoint_step"], final)
  return final
