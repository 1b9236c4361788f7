from unittest import mock

import pytest

from flax_detector import memory_guard, train


def test_activation_count_of_the_first_stage_by_hand():
  # width 1/64 -> every stage has width 1 (64/64) or more; count stage 1 of a 32-px image by hand.
  total = memory_guard.activation_bytes_per_example(32, 1 / 64, batch_norm=False, dtype_bytes=1)
  stage1 = 32 * 32 * 1 * 2 * 2 + 16 * 16 * 1  # two convs (conv + relu outputs), then the pooled output
  assert total > stage1
  assert memory_guard.activation_bytes_per_example(32, 1 / 64, True, 1) > total  # BatchNorm keeps more
  assert memory_guard.activation_bytes_per_example(64, 1 / 64, False, 1) == pytest.approx(4 * total, rel=0.05)


def test_a_step_that_cannot_fit_is_refused_before_compiling(make_config):
  config = make_config(image_size=1000, data__crop_policy="pad")
  # build_experiment only wraps the steps in jax.jit; nothing is traced or compiled before the check.
  with mock.patch.object(memory_guard.psutil, "virtual_memory", return_value=mock.Mock(available=2**30)):
    with pytest.raises(ValueError, match=r"image_size=1000 .* GiB .*batch_size"):
      train.build_experiment(config)


def test_the_tiny_config_fits(make_config):
  estimate = memory_guard.check_train_step(32, 16, 1 / 16, True, "float32", 10**5)
  assert estimate.fits and 0 < estimate.needed < estimate.limit
