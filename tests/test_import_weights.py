"""import_weights: torchvision VGG16 / VGG16-BN safetensors into a workdir that predict reads as a trained run."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flax_detector import errors, import_weights, inference, predict
from flax_detector.torchvision_weights import WeightsFileError
from tests import torchvision_layout
from tests.conftest import tiny_config

WIDTH = 1 / 16
IMAGE_SIZE = 64  # five pools leave 2x2 before the 7x7 adaptive pool: the 49 positions differ


def _config(**overrides):
  # eval_grid 1 and images of exactly IMAGE_SIZE: predict's one view is the image itself.
  return tiny_config(image_size=IMAGE_SIZE, data__eval_grid=1, **overrides)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """{batch_norm: (state dict, workdir)}: VGG16-BN through the function, plain VGG16 through the command line."""
  folder = tmp_path_factory.mktemp("imported")
  with_bn = torchvision_layout.random_state_dict(True, WIDTH, 2, seed=1)
  import_weights.import_weights(
    torchvision_layout.save(with_bn, folder / "bn.safetensors"), str(folder / "bn"), _config()
  )
  plain = torchvision_layout.random_state_dict(False, WIDTH, 2, seed=2)
  command = [
    sys.executable,
    "-m",
    "flax_detector.import_weights",
    f"--source={folder / 'plain.safetensors'}",
    f"--workdir={folder / 'plain'}",
    "--config=configs/vgg16.py:cpu",
    f"--config.model.width_multiplier={WIDTH}",
    f"--config.image_size={IMAGE_SIZE}",
    "--config.data.eval_grid=1",
  ]
  torchvision_layout.save(plain, folder / "plain.safetensors")
  done = subprocess.run(
    command, capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__))
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "Imported vgg16 weights" in done.stdout
  return {True: (with_bn, folder / "bn"), False: (plain, folder / "plain")}


def test_batch_norm_is_read_from_the_tensor_names(imported):
  for batch_norm, (_, workdir) in imported.items():
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["batch_norm"] is batch_norm  # the cpu preset says True; the plain file said otherwise


def test_imported_checkpoint_holds_the_weights_in_flax_layout(imported):
  state, workdir = imported[True]
  detector = inference.load_detector(workdir, batch_size=8)
  params, stats = detector._variables["params"], detector._variables["batch_stats"]  # pylint: disable=protected-access
  assert detector.step == 0
  conv = state["features.0.weight"]  # (out, in, kh, kw)
  assert np.asarray(params["Conv_0"]["kernel"])[2, 0, 1, 3] == conv[3, 1, 2, 0]
  last_conv = state["features.40.weight"]
  assert np.array_equal(np.asarray(params["Conv_12"]["kernel"]), last_conv.transpose(2, 3, 1, 0))
  first_linear = state["classifier.0.weight"]  # inputs flattened (channel, row, column)
  channels = last_conv.shape[0]
  for channel, row, column, output in [(0, 0, 1, 5), (channels - 1, 6, 2, 0), (3, 4, 6, 17)]:
    assert (
      np.asarray(params["Dense_0"]["kernel"])[(row * 7 + column) * channels + channel, output]
      == first_linear[output, channel * 49 + row * 7 + column]
    )
  assert np.array_equal(np.asarray(params["Dense_2"]["kernel"]), state["classifier.6.weight"].T)
  assert np.array_equal(np.asarray(params["BatchNorm_4"]["scale"]), state["features.15.weight"])
  assert np.array_equal(np.asarray(stats["BatchNorm_4"]["var"]), state["features.15.running_var"])
  assert np.array_equal(np.asarray(stats["BatchNorm_12"]["mean"]), state["features.41.running_mean"])


def _torch_vgg16(state: dict[str, np.ndarray], batch_norm: bool):
  """torchvision's VGG (features, avgpool, classifier) built by hand, loaded strictly from `state`."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  layers, inputs = [], 3
  for width in torchvision_layout.conv_widths(WIDTH):
    if width == "M":
      layers.append(nn.MaxPool2d(2, 2))
      continue
    layers += [nn.Conv2d(inputs, width, 3, padding=1), *([nn.BatchNorm2d(width)] if batch_norm else []), nn.ReLU()]
    inputs = width
  hidden, classes = state["classifier.3.weight"].shape[0], state["classifier.6.weight"].shape[0]
  model = nn.Module()
  model.features, model.avgpool = nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7))
  model.classifier = nn.Sequential(
    nn.Linear(inputs * 49, hidden),
    nn.ReLU(),
    nn.Dropout(),
    nn.Linear(hidden, hidden),
    nn.ReLU(),
    nn.Dropout(),
    nn.Linear(hidden, classes),
  )
  model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()}, strict=True)
  return model.eval()


def _torch_softmax(model, images: np.ndarray) -> np.ndarray:
  """torchvision's preprocessing (ToTensor, Normalize with ImageNet statistics), then the model's softmax."""
  torch = pytest.importorskip("torch")
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
  with torch.no_grad():
    features = model.avgpool(model.features((pixels - mean[:, None, None]) / std[:, None, None]))
    return torch.softmax(model.classifier(torch.flatten(features, 1)), dim=1).numpy()


@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg16", "vgg16_bn"])
def test_predict_scores_equal_torch_softmax(imported, tmp_path, batch_norm):
  state, workdir = imported[batch_norm]
  model = _torch_vgg16(state, batch_norm)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  images[1, :32] = 255  # a bright top half: a map whose pooled positions really differ
  paths = []
  for index, image in enumerate(images):
    paths.append(str(tmp_path / f"{index}.png"))
    Image.fromarray(image).save(paths[-1])
  predict.predict(str(workdir), paths, str(tmp_path / "scores.csv"), batch_size=8)
  with open(tmp_path / "scores.csv", newline="") as stream:
    p_ai = {row["path"]: float(row["p_ai"]) for row in csv.DictReader(stream)}
  expected = _torch_softmax(model, images)[:, 1]
  assert 0.02 < expected.min() and expected.max() < 0.98  # not saturated: the comparison means something
  assert np.abs(np.array([p_ai[path] for path in paths]) - expected).max() <= 1e-4


def test_width_mismatch_names_the_tensor_and_both_shapes(tmp_path):
  source = torchvision_layout.save(torchvision_layout.random_state_dict(False, WIDTH, 2), tmp_path / "w.safetensors")
  with pytest.raises(WeightsFileError) as raised:
    import_weights.import_weights(source, str(tmp_path / "out"), _config(model__width_multiplier=1 / 8))
  assert "features.0.weight has shape (4, 3, 3, 3), the model needs (8, 3, 3, 3)" in str(raised.value)
  assert "model.width_multiplier=0.125" in str(raised.value)
  assert "init_from" not in str(raised.value)  # that hint is for a head with another class count only
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_class_count_mismatch_names_the_head_and_points_to_init_from(tmp_path):
  source = torchvision_layout.save(torchvision_layout.random_state_dict(True, WIDTH, 5), tmp_path / "w.safetensors")
  with pytest.raises(errors.UserError) as raised:
    import_weights.import_weights(source, str(tmp_path / "out"), _config())
  message = str(raised.value)
  assert "classifier.6.weight has shape (5, 256), the model needs (2, 256)" in message
  assert "classifier.6.bias has shape (5,), the model needs (2,)" in message
  assert "--config.init_from" in message


def test_a_state_dict_that_is_not_vgg16_lists_the_missing_tensors(tmp_path):
  state = torchvision_layout.random_state_dict(True, WIDTH, 2)
  del state["features.41.running_var"]
  state["fc.weight"] = np.zeros((2, 2), np.float32)
  source = torchvision_layout.save(state, tmp_path / "w.safetensors")
  with pytest.raises(
    WeightsFileError,
    match=r"not a torchvision vgg16_bn state dict: 1 tensors missing "
    r"\['features.41.running_var'\], 1 unexpected \['fc.weight'\]",
  ):
    import_weights.import_weights(source, str(tmp_path / "out"), _config())


def test_a_file_that_is_not_safetensors_is_a_user_error(tmp_path):
  (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(errors.UserError, match="cannot be read as safetensors"):
    import_weights.import_weights(str(tmp_path / "w.safetensors"), str(tmp_path / "out"), _config())


def test_a_workdir_with_checkpoints_is_refused(imported):
  state, workdir = imported[True]
  source = torchvision_layout.save(state, workdir.parent / "again.safetensors")
  with pytest.raises(errors.UserError, match="already holds checkpoints"):
    import_weights.import_weights(source, str(workdir), _config())
