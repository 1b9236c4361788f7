"""Classifies images with a trained detector: `python -m flax_detector.predict --workdir=DIR PATH...`.

Writes CSV `path,p_ai,label` (one row per readable image) to stdout or --output. Unreadable files
get a warning on stderr and no row; the exit code is non-zero only when no image could be read.
"""

from collections.abc import Iterator, Sequence
from concurrent import futures
import contextlib
import csv
import sys
from typing import Any

from absl import app, flags, logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from flax_detector import preprocess, sharding
from flax_detector import workdir as workdir_module
from flax_detector.checkpoint import abstract_with_shardings, restore_model_variables
from flax_detector.data.decode import UnreadableImageError, read_image
from flax_detector.data.folder import list_images
from flax_detector.models import create_model, view_averaged_log_probs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.")
flags.DEFINE_string("output", None, "CSV file to write; stdout when unset.")
flags.DEFINE_integer("batch_size", None, "Images per inference batch; defaults to the config's eval_batch_size.")
flags.mark_flag_as_required("workdir")


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given, folders expanded recursively to their image files; missing paths warned about."""
  expanded: list[str] = []
  for given in paths:
    path = epath.Path(given)
    if path.is_dir():
      expanded.extend(str(image) for image in list_images(path))
    elif path.exists():
      expanded.append(given)
    else:
      print(f"warning: {given}: no such file or folder", file=sys.stderr)
  return expanded


def _load(path: str, image_size: int, mode: str, grid: int) -> np.ndarray | None:
  try:
    return preprocess.eval_transform(read_image(path), image_size, mode, grid)
  except UnreadableImageError as error:
    print(f"warning: skipping {error}", file=sys.stderr)
    return None


def _decoded_batches(paths: list[str], batch_size: int, image_size: int, mode: str,
                     grid: int) -> Iterator[tuple[list[str], np.ndarray]]:
  """(readable paths, uint8[batch_size, views, S, S, 3] padded) per batch; decoding runs in threads."""
  with futures.ThreadPoolExecutor() as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      loaded = list(pool.map(lambda p: _load(p, image_size, mode, grid), chunk))
      readable = [(path, image) for path, image in zip(chunk, loaded) if image is not None]
      if not readable:
        continue
      images = np.zeros((batch_size, grid**2, image_size, image_size, 3), np.uint8)
      images[:len(readable)] = np.stack([image for _, image in readable])
      yield [path for path, _ in readable], images


def predict(workdir: str, paths: Sequence[str], output: str | None, batch_size: int | None) -> int:
  """Writes the CSV and returns the number of images classified."""
  workdir_path = epath.Path(workdir)
  config = workdir_module.load_config(workdir_path)
  class_names = list(config.data.class_names)
  positive = class_names.index(config.data.positive_class)
  model = create_model(config.model, len(class_names))
  mesh = sharding.create_mesh()
  batch_size = batch_size or config.eval_batch_size
  sharding.check_divisible(batch_size, "--batch_size", mesh)

  dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.uint8)
  abstract = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, dummy, train=False))
  abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  variables, step = restore_model_variables(workdir_path / workdir_module.CHECKPOINTS, abstract_with_shardings(abstract, replicated))
  logging.info("Loaded checkpoint step %d from %s", step, workdir_path)

  @jax.jit
  def probabilities(variables: Any, images: jax.Array) -> jax.Array:
    # Variables are an argument, not a closure: as constants they would be baked into the program.
    return jnp.exp(view_averaged_log_probs(model.apply, variables, images))

  batch_sharding = sharding.batch_sharding(mesh)
  written = 0
  with open(output, "w", newline="") if output else contextlib.nullcontext(sys.stdout) as stream:
    writer = csv.writer(stream)
    writer.writerow(["path", "p_ai", "label"])
    for batch_paths, images in _decoded_batches(expand_paths(paths), batch_size, config.image_size,
                                                config.data.preprocess, config.data.get("eval_grid", 1)):
      probs = np.asarray(probabilities(variables, jax.device_put(images, batch_sharding)))[:len(batch_paths)]
      for path, row in zip(batch_paths, probs):
        writer.writerow([path, f"{row[positive]:.6f}", class_names[int(np.argmax(row))]])
      written += len(batch_paths)
  return written


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Give one or more image files or folders to classify.")
  try:
    written = predict(FLAGS.workdir, paths, FLAGS.output, FLAGS.batch_size)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  if written == 0:
    print("error: no readable image among the given paths", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
