import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from local_jobs import series

from flax_detector import sharding, train
from flax_detector.models import VGG16


def _vgg16_state_bytes(strategy: str) -> tuple[int, int]:
  """Per-device bytes of (params, optimizer state) of the full VGG16 on the 8 test devices."""
  model = VGG16(num_classes=2, batch_norm=True)
  optimizer = optax.adamw(1e-4)

  def init():
    variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 224, 224, 3), jnp.uint8), train=False)
    return variables["params"], optimizer.init(variables["params"])

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, sharding.create_mesh(), strategy)
  return (sharding.bytes_per_device(abstract[0], shardings[0]), sharding.bytes_per_device(abstract[1], shardings[1]))


def test_fsdp_holds_an_eighth_of_the_parameters_per_device():
  assert jax.device_count() == 8
  dp_params, dp_optimizer = _vgg16_state_bytes("dp")
  fsdp_params, fsdp_optimizer = _vgg16_state_bytes("fsdp")
  assert dp_params == 134_277_186 * 4
  assert fsdp_params / dp_params == pytest.approx(1 / 8, rel=0.01)
  assert fsdp_optimizer / dp_optimizer == pytest.approx(1 / 8, rel=0.01)


def test_fsdp_splits_the_largest_evenly_divisible_dimension():
  assert sharding.fsdp_spec((25088, 4096), 8) == jax.sharding.PartitionSpec("data", None)
  assert sharding.fsdp_spec((3, 3, 512, 512), 8) == jax.sharding.PartitionSpec(None, None, "data", None)
  assert sharding.fsdp_spec((4096, 8), 8) == jax.sharding.PartitionSpec("data", None)
  assert sharding.fsdp_spec((4096,), 8) == jax.sharding.PartitionSpec("data")
  assert sharding.fsdp_spec((512,), 8) == jax.sharding.PartitionSpec()  # small: replicated
  assert sharding.fsdp_spec((3, 3, 3, 20001), 8) == jax.sharding.PartitionSpec()  # nothing divides


def test_fsdp_trains_like_dp(trained_workdir, make_config, tmp_path):
  fsdp = train.train_and_evaluate(make_config(sharding="fsdp"), str(tmp_path))
  np.testing.assert_allclose(series(tmp_path, "train_loss"), series(trained_workdir, "train_loss"), rtol=0, atol=1e-3)
  dp = train.train_and_evaluate(make_config(), str(trained_workdir))  # already finished: evaluates only
  assert fsdp["num_examples"] == dp["num_examples"]
  assert abs(fsdp["eval_loss"] - dp["eval_loss"]) < 1e-2
