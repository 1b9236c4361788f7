import pytest

from configs.vgg16 import get_config
from flax_detector import config_validation
from flax_detector.data import host_resources


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 1), (4, 2), (16, 14), (64, host_resources.MAX_AUTO_WORKERS)])
def test_auto_worker_count_leaves_the_training_process_its_cores(cores, workers):
  assert host_resources.auto_worker_count(cores) == workers


def test_worker_count_minus_one_is_resolved_from_the_host(monkeypatch):
  monkeypatch.setattr(host_resources, "usable_cores", lambda: 7)
  config = get_config()
  assert config.data.worker_count == -1  # the accelerator recipe asks the host
  assert config_validation.validate(config).data.worker_count == 5
  assert get_config("cpu").data.worker_count == 1  # the cpu preset keeps one worker for a 2-core laptop


def test_worker_count_below_minus_one_is_named():
  config = get_config("cpu")
  config.data.worker_count = -2
  with pytest.raises(ValueError, match=r"data.worker_count=-2: use -1"):
    config_validation.validate(config)
