"""A fixed-seed run's parameters stay bitwise the same across refactors.

The digest below was recorded from the tiny run (conftest.tiny_config, 8 simulated CPU devices, the pinned JAX)
before the code-health refactor of issue 8. A change that is meant to alter the numbers (a new convolution
algorithm, a different augmentation) re-records it with `python -m tests.test_bitwise_golden` and says so in its
commit; any other change that moves it changed behaviour by accident.
"""

import hashlib
import pathlib

import jax
import numpy as np

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tiny_run_params.sha256"


def params_digest(workdir) -> str:
  """SHA-256 over every parameter and batch statistic of the run's newest checkpoint, in tree order."""
  from flax_detector import inference  # pylint: disable=g-import-not-at-top

  detector = inference.load_detector(workdir)
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(detector._variables):  # pylint: disable=protected-access
    array = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(array.dtype).encode() + str(array.shape).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def test_fixed_seed_run_gives_the_recorded_parameters_bitwise(trained_workdir):
  assert params_digest(trained_workdir) == GOLDEN.read_text().strip()


if __name__ == "__main__":
  import tempfile  # pylint: disable=g-import-not-at-top

  from tests import conftest  # First: it sets the 8 simulated devices before JAX starts.

  # isort: split
  from flax_detector import train

  with tempfile.TemporaryDirectory() as directory:
    train.train_and_evaluate(conftest.tiny_config(), directory)
    GOLDEN.write_text(params_digest(directory) + "\n")
  print(GOLDEN.read_text(), end="")
