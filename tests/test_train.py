import contextlib
import dataclasses
import functools
import json
import multiprocessing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from local_jobs import read_scalars

from flax_detector import input_pipeline, report, sharding, train
from flax_detector.checkpoint import restore_model_variables
from flax_detector.models import create_model, view_averaged_log_probs

FIXED_SCALARS = (
  "train_loss",
  "train_accuracy",
  "learning_rate",
  "eval_loss",
  "eval_accuracy",
  "eval_precision",
  "eval_recall",
  "eval_f1",
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_few_steps_lower_the_loss(make_config, dtype):
  config = make_config(model__dropout_rate=0.0, model__dtype=dtype)
  splits = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config))
  batch = input_pipeline.train_dataset(splits.train, input_pipeline.TrainSettings.from_config(config), 0, 1)[0]
  model = create_model(config.model, 2)
  state = train.create_train_state(config, model, train.create_optimizer(config, optax.constant_schedule(1e-3)))
  step = jax.jit(functools.partial(train.train_step, class_weights=np.ones(2, np.float32)))
  losses = []
  for _ in range(15):
    state, step_metrics = step(state, batch)
    losses.append(float(step_metrics.compute()["train_loss"]))
  assert int(state.step) == 15
  assert losses[-1] < 0.5 * losses[0], losses
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))  # params stay float32


def test_learning_rate_warms_up_then_decays_to_zero(make_config):
  schedule = train.create_learning_rate_fn(make_config(learning_rate=0.1, warmup_epochs=1.0), 10, 100)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
  assert float(schedule(55)) < 0.1 and float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_end_to_end_run_writes_metrics_checkpoints_and_scalars(trained_workdir, make_config):
  final = json.loads((trained_workdir / "final_metrics.json").read_text())
  config = make_config()
  assert final["num_examples"] == config.data.synthetic_test_size
  assert np.asarray(final["confusion_matrix"]).sum() == config.data.synthetic_test_size
  for key in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1", "eval_loss"):
    assert 0.0 <= final[key] < float("inf")
  train_split = input_pipeline.load_splits(input_pipeline.SourceSettings.from_config(config)).train
  steps = input_pipeline.Schedule.from_config(config).steps(len(train_split))
  assert final["checkpoint_step"] == steps
  assert (trained_workdir / "checkpoints" / str(steps)).is_dir()
  assert json.loads((trained_workdir / "config.json").read_text())["image_size"] == config.image_size

  scalars = read_scalars(trained_workdir)
  missing = [name for name in FIXED_SCALARS if name not in scalars]
  assert not missing, f"missing scalars {missing} among {sorted(scalars)}"
  for name in FIXED_SCALARS:
    assert np.all(np.isfinite(list(scalars[name].values()))), (name, scalars[name])


def test_resumed_run_matches_an_uninterrupted_one_bitwise(trained_workdir, make_config, tmp_path):
  config = make_config()
  total = json.loads((trained_workdir / "final_metrics.json").read_text())["checkpoint_step"]
  interrupted = make_config(num_train_steps=total // 2 + 1)
  train.train_and_evaluate(interrupted, str(tmp_path))
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert resumed["checkpoint_step"] == total

  _assert_same_final_variables(trained_workdir, tmp_path, config)
  assert resumed == json.loads((trained_workdir / "final_metrics.json").read_text())


def _assert_same_final_variables(workdir_a, workdir_b, config):
  model = create_model(config.model, 2)
  abstract = jax.eval_shape(
    lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)
  )
  abstract = {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
  variables_a, _ = restore_model_variables(workdir_a / "checkpoints", abstract)
  variables_b, _ = restore_model_variables(workdir_b / "checkpoints", abstract)
  for a, b in zip(jax.tree.leaves(variables_a), jax.tree.leaves(variables_b), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_with_another_model_is_a_clear_error(trained_workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(trained_workdir / "checkpoints", tmp_path / "checkpoints")
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="does not fit the model"):
    train.train_and_evaluate(tiny_config(model__width_multiplier=1 / 8), str(tmp_path))


def test_a_relative_workdir_works(make_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  final = train.train_and_evaluate(make_config(num_train_steps=2), "runs/relative")
  assert final["checkpoint_step"] == 2
  assert (tmp_path / "runs/relative/checkpoints/2").is_dir()
  assert (tmp_path / "runs/relative/final_metrics.json").exists()


def test_resume_through_grain_worker_state_matches_a_run_without_workers(trained_workdir, make_config, tmp_path):
  """Grain's own iterator state (saved with 1 worker process) restores the exact data position."""
  total = json.loads((trained_workdir / "final_metrics.json").read_text())["checkpoint_step"]
  train.train_and_evaluate(make_config(data__worker_count=1, num_train_steps=total // 2), str(tmp_path))
  resumed = train.train_and_evaluate(make_config(data__worker_count=1), str(tmp_path))
  _assert_same_final_variables(trained_workdir, tmp_path, make_config())
  assert resumed == json.loads((trained_workdir / "final_metrics.json").read_text())


def test_training_inputs_close_before_the_final_evaluation(make_config, tmp_path, monkeypatch):
  """The train iterator and the periodic validation close (and end their Grain workers) when training ends.

  Left open, their idle workers (each about 0.33 GB of its own memory for the cpu preset) sit beside the final
  passes' own.
  """
  open_iterators: set[int] = set()
  open_at_final_evaluation = []
  make_iterator, final_evaluation = input_pipeline.make_iterator, train._final_evaluation  # pylint: disable=protected-access

  def noting_closes(*args, **kwargs):
    iterator = make_iterator(*args, **kwargs)
    open_iterators.add(id(iterator))
    close = iterator.close
    iterator.close = lambda: (open_iterators.discard(id(iterator)), close())
    return iterator

  def noting_open_iterators(*args, **kwargs):
    open_at_final_evaluation.append(len(open_iterators))
    return final_evaluation(*args, **kwargs)

  monkeypatch.setattr(input_pipeline, "make_iterator", noting_closes)
  monkeypatch.setattr(train, "_final_evaluation", noting_open_iterators)
  train.train_and_evaluate(make_config(data__worker_count=1, num_train_steps=4), str(tmp_path))
  assert open_at_final_evaluation == [1]  # the final passes' own
  assert not open_iterators


def test_a_reused_evaluator_keeps_its_workers_and_scores_every_pass_alike(make_config):
  """Each call takes exactly one pass of the repeated split: the same numbers as a one-off evaluation."""
  experiment = train.build_experiment(make_config(data__worker_count=1))
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  split, grid = experiment.splits.test, experiment.config.data.eval_grid
  with contextlib.closing(experiment.evaluator([split], grid=grid, reuse=False)) as once:
    expected, expected_scores = once(state)
  with contextlib.closing(experiment.evaluator([split], grid=grid, reuse=True)) as reused:
    workers = None
    for _ in range(3):
      summary, scores = reused(state)
      assert summary == expected and summary["num_examples"] == len(split)
      np.testing.assert_array_equal(scores.log_probs, expected_scores.log_probs)
      workers = workers or set(multiprocessing.active_children())
      assert workers and set(multiprocessing.active_children()) == workers  # no worker started or stopped


def test_the_eval_step_scores_each_view_through_one_compiled_forward_pass(make_config):
  """Per-view calls give the whole batch's view-averaged scores, and every grid uses the same compiled forward."""
  experiment = train.build_experiment(make_config())
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for grid in (1, 2):
    settings = dataclasses.replace(input_pipeline.EvalSettings.from_config(experiment.config), grid=grid)
    local = input_pipeline.eval_dataset(experiment.splits.test, settings, 0, 1)[0]
    _, scores = experiment.eval_step(state, sharding.to_global_batch(local, experiment.batch_sharding))
    whole_batch = jax.jit(lambda variables, images: view_averaged_log_probs(state.apply_fn, variables, images))
    np.testing.assert_allclose(scores["log_probs"], whole_batch(variables, local["image"]), rtol=1e-5, atol=1e-6)
  assert experiment.eval_step.logits._cache_size() == 1  # pylint: disable=protected-access


def test_one_evaluator_scores_its_planned_passes_in_order(make_config):
  """The final evaluation's test pass, then its validation pass, as separate one-off evaluators score them."""
  experiment = train.build_experiment(make_config())
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  splits, grid = experiment.splits, experiment.config.data.eval_grid
  with contextlib.closing(experiment.evaluator([splits.test, splits.validation], grid=grid, reuse=False)) as both:
    for split in (splits.test, splits.validation):
      with contextlib.closing(experiment.evaluator([split], grid=grid, reuse=False)) as alone:
        expected, expected_scores = alone(state)
      summary, scores = both(state)
      assert summary == expected and summary["num_examples"] == len(split)
      np.testing.assert_array_equal(scores.log_probs, expected_scores.log_probs)
    with pytest.raises(RuntimeError, match="every pass"):
      both(state)


def test_calibration_reuses_the_last_validation_when_it_is_at_eval_grid(make_config, tmp_path, monkeypatch):
  """With periodic_eval_grid == eval_grid the validation split is scored once at the end, same calibration.

  The final passes then plan the test split alone, so their workers decode no validation batch; a run
  resumed after its last step (no validation left to reuse) plans and scores the validation split again.
  """
  scored, planned = [], []
  score_pass, plan_evaluator = train._score_pass, train.Experiment.evaluator  # pylint: disable=protected-access

  def counting(evaluator, state, split, grid):
    scored.append(len(split))
    return score_pass(evaluator, state, split, grid)

  def noting_final_plans(self, splits, *, grid, reuse):
    if not reuse:
      planned.append([len(split) for split in splits])
    return plan_evaluator(self, splits, grid=grid, reuse=reuse)

  monkeypatch.setattr(train, "_score_pass", counting)
  monkeypatch.setattr(train.Experiment, "evaluator", noting_final_plans)
  config = make_config(num_train_steps=3, data__periodic_eval_grid=2)
  train.train_and_evaluate(config, str(tmp_path))
  experiment = train.build_experiment(config)
  test_size, validation_size = len(experiment.splits.test), len(experiment.splits.validation)
  assert scored == [test_size]  # the test pass only: no second validation pass
  assert planned == [[test_size]]
  calibration = json.loads((tmp_path / "calibration.json").read_text())
  train.train_and_evaluate(config, str(tmp_path))  # every step done: nothing to reuse
  assert planned[1:] == [[test_size, validation_size]] and scored[1:] == [test_size, validation_size]
  assert json.loads((tmp_path / "calibration.json").read_text()) == calibration
  state = jax.jit(experiment.init_state, out_shardings=experiment.state_shardings)()
  abstract = jax.eval_shape(lambda: {"params": state.params, "batch_stats": state.batch_stats})
  variables, _ = restore_model_variables(tmp_path / "checkpoints", abstract)
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  with contextlib.closing(experiment.evaluator([experiment.splits.validation], grid=2, reuse=False)) as once:
    _, scores = once(state)
  positive = list(config.data.class_names).index(config.data.positive_class)
  expected = json.loads(json.dumps(report.fit_calibration(scores.log_probs, scores.labels, positive)))
  assert json.loads((tmp_path / "calibration.json").read_text()) == expected


@pytest.mark.parametrize("scale", [0.01, 100.0], ids=["unclipped", "clipped"])
def test_global_norm_clipping_matches_optax(scale):
  gradients = {
    "kernel": jax.random.normal(jax.random.key(0), (33, 17)) * scale,
    "bias": jax.random.normal(jax.random.key(1), (17,)) * scale,
  }
  ours, _ = train.clip_by_global_norm(1.0).update(gradients, optax.ClipByGlobalNormState())
  reference, _ = optax.clip_by_global_norm(1.0).update(gradients, optax.ClipByGlobalNormState())
  for name in gradients:
    if scale < 1:  # below the threshold the factor is exactly 1: the gradients pass through bitwise
      np.testing.assert_array_equal(ours[name], gradients[name])
    np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6)
  assert float(optax.global_norm(ours)) == pytest.approx(min(1.0, float(optax.global_norm(gradients))), rel=1e-6)
  assert jax.tree.structure(train.clip_by_global_norm(1.0).init(gradients)) == jax.tree.structure(
    optax.clip_by_global_norm(1.0).init(gradients)
  )
