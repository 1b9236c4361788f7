import pytest

from flax_detector import benchmark


def test_benchmark_reports_both_rates_and_memory(make_config):
  config = make_config()
  input_rates = benchmark.benchmark_input(config, steps=2, warmup=1)
  assert input_rates["input_images_per_second"] > 0
  train_rates = benchmark.benchmark_train_step(config, steps=2, warmup=1)
  assert train_rates["train_steps_per_second"] > 0 and train_rates["devices"] == 8
  assert train_rates["train_images_per_second"] == train_rates["train_steps_per_second"] * config.batch_size
  # AdamW keeps two moments per parameter (plus a few scalars).
  assert train_rates["optimizer_mib_per_device"] == pytest.approx(2 * train_rates["params_mib_per_device"], rel=0.01)
