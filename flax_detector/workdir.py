"""The layout of a run's folder (`--workdir`): one place that names every file a run writes.

Training, prediction, evaluation and the launch scripts all read and write the same folder; naming
its files here keeps them from drifting apart. JSON files are written atomically, so a crash never
leaves a half-written one for a later command to trip over.
"""

import json
import os
from typing import Any

import ml_collections
from etils import epath

CONFIG = "config.json"  # the config of the last run, read back by predict and evaluate
CHECKPOINTS = "checkpoints"  # Orbax checkpoints of train state + data iterator
UNRESTORABLE_CHECKPOINTS = "unrestorable_checkpoints"  # damaged steps a resume skipped, kept for inspection
FINAL_METRICS = "final_metrics.json"  # test metrics after training
AUDIT = "audit.json"  # dataset shortcut audit, written at the start of training
SKIPPED_FILES = "skipped_files.txt"  # files of the data folder left out, one `path<TAB>reason` per line
FILE_INDEX_CACHE = "file_index_cache.json"  # probe results by path, size and mtime, so resuming re-probes nothing
CALIBRATION = "calibration.json"  # temperature and decision threshold fitted on the validation split
REPORT = "report"  # default output folder of flax_detector.evaluate
RUN_LOCK = "run.lock"  # held (flock) by the training run using the folder; JSON names its owner


def is_url(path: epath.PathLike) -> bool:
  """True for remote paths such as gs://bucket/run, which etils.epath opens and os.path does not."""
  return "://" in os.fspath(path)


def absolute(path: epath.PathLike) -> epath.Path:
  """An absolute path (Orbax and TensorStore reject relative ones); URLs are returned as they are."""
  if is_url(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path)))


def write_json(path: epath.Path, payload: Any) -> None:
  """Writes via a temporary file and a rename, so a crash never leaves a half-written file."""
  temporary = path.parent / f".{path.name}.tmp"
  temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  temporary.replace(path)


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def load_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = epath.Path(workdir) / CONFIG
  if not path.exists():
    raise FileNotFoundError(f"{path}: missing; --workdir must be a directory that flax_detector.main trained in")
  return ml_collections.ConfigDict(read_json(path))
