"""Packs an image folder into ArrayRecord shards: `python -m flax_detector.prepare --data_dir=SRC --out=DST`.

Reading ~22k small files per epoch from a bucket is slow on a TPU pod; a few large shards are not.
SRC is indexed exactly as ImageFolderSource indexes it (train/ and test/, the same class folders, the
same file order, the same probe that leaves out unreadable, truncated and oversized files), and each
record keeps the original encoded bytes (no re-encoding: generator traces live in single pixels) with
the label and the path relative to SRC as its key. Training on DST therefore sees the same records in
the same order, the same validation split and the same pixels as training on SRC. The layout and the
record format are documented in flax_detector/data/array_record.py.

An interrupted run never leaves a DST that looks complete: everything is written to a staging folder
first. For a local DST the staging folder is a hidden sibling, renamed to DST at the end. SRC and DST
may be gs:// (or any etils.epath) URLs; ArrayRecordWriter needs a local file, so for a remote DST the
shards are staged in a local temporary folder (it needs room for the whole output) and copied with
epath, prepared.json last: readers require prepared.json, so a partial copy is never taken as complete.
"""

import collections
import functools
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

from absl import app, flags, logging
from array_record.python import array_record_module
from etils import epath

from flax_detector import workdir
from flax_detector.data.array_record import (
  FORMAT_VERSION,
  INDEX_NAME,
  MANIFEST_NAME,
  RECORD_FORMAT,
  encode_record,
  shard_name,
)
from flax_detector.data.decode import read_bytes, read_or_skip
from flax_detector.data.folder import ImageFolderSource
from flax_detector.data.probe import printable

SPLITS = ("train", "test")
IMAGES_PER_SHARD = 1000
# group_size:1 makes every record its own chunk, so reading one record at random costs one read.
WRITER_OPTIONS = "group_size:1"


def default_num_shards(num_images: int) -> int:
  return max(1, round(num_images / IMAGES_PER_SHARD))


def _check_destination(data_dir: str, out: str, overwrite: bool) -> None:
  """Fails before any work when DST would clobber data: a non-empty DST needs --overwrite, SRC never goes."""
  src, dst = workdir.absolute(data_dir), workdir.absolute(out)
  if dst == src or dst in src.parents:
    raise ValueError(
      f"--out={out} is --data_dir={data_dir} or holds it; choose another folder (--overwrite would delete the images)"
    )
  if dst.exists() and not dst.is_dir():
    raise FileExistsError(f"--out={out} is a file; choose a folder")
  if dst.exists() and any(True for _ in dst.iterdir()) and not overwrite:
    raise FileExistsError(f"--out={out} is not empty; pass --overwrite to replace it, or choose another folder")


def _index(data_dir: str, class_names: Sequence[str]) -> dict[str, ImageFolderSource]:
  """Lists SRC with ImageFolderSource itself, so order and keys cannot drift from training on the folder."""
  try:
    return {split: ImageFolderSource(data_dir, split, class_names) for split in SPLITS}
  except (FileNotFoundError, ValueError) as error:
    # ImageFolderSource speaks of the training config; name this command's flags too.
    raise type(error)(
      f"{error} (flax_detector.prepare: --data_dir={data_dir} --class_names={','.join(class_names)})"
    ) from error


def _read_in_order(paths: Sequence[str], num_threads: int) -> Iterator[bytes | None]:
  """Every file's bytes in order, None for one that vanished since the index checked that it decodes.

  A bounded number of files is in flight: reading from a bucket is latency-bound.
  """
  window = 4 * num_threads
  with futures.ThreadPoolExecutor(num_threads) as pool:
    pending: collections.deque[futures.Future] = collections.deque()
    for path in paths:
      pending.append(pool.submit(read_or_skip, functools.partial(read_bytes, path), "left out of the prepared copy"))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _open_writer(path: epath.Path) -> array_record_module.ArrayRecordWriter:
  writer = array_record_module.ArrayRecordWriter(str(path), WRITER_OPTIONS)
  if not writer.ok():
    raise OSError(f"{path}: cannot create the shard; check the folder is writable and has room")
  return writer


def _write_split(
  source: ImageFolderSource,
  split: str,
  class_names: Sequence[str],
  staging: epath.Path,
  num_shards: int,
  num_threads: int,
) -> dict[str, Any]:
  """Writes one split's shards and index.json into staging/<split>; returns its prepared.json entry.

  Shard s takes the listed files [n*s/N, n*(s+1)/N), so the shards concatenate to the folder's order;
  files skipped as unreadable leave their shard a little shorter.
  """
  if num_shards > len(source):
    logging.info("%s: %d shards requested for %d files; writing %d", split, num_shards, len(source), len(source))
    num_shards = len(source)
  bounds = [len(source) * shard // num_shards for shard in range(num_shards + 1)]
  names = [shard_name(split, shard, num_shards) for shard in range(num_shards)]
  (staging / split).mkdir(parents=True)
  files = _read_in_order(source.paths, num_threads)
  keys: list[str] = []
  labels: list[int] = []
  sizes: list[list[int]] = []
  skipped: list[str] = [printable(source.key_of(info.path)) for info in source.skipped]
  num_bytes = 0
  for shard, name in enumerate(names):
    writer = _open_writer(staging / split / name)
    try:
      for index in range(bounds[shard], bounds[shard + 1]):
        data = next(files)
        key, label = source.keys[index], int(source.labels[index])
        if data is None:
          skipped.append(key)
          continue
        writer.write(encode_record(key, label, data))
        keys.append(key)
        labels.append(label)
        sizes.append([int(side) for side in source.sizes[index]])
        num_bytes += len(data)
    finally:
      writer.close()
  counts = {name: labels.count(label) for label, name in enumerate(class_names)}
  empty = [name for name, count in counts.items() if not count]
  if empty:
    raise ValueError(f"{split}/: no readable image of class {empty} (skipped {skipped}); fix or add images")
  (staging / split / INDEX_NAME).write_text(json.dumps({"keys": keys, "labels": labels, "sizes": sizes}))
  logging.info(
    "%s: %d images (%s), %.1f MB in %d shards; %d unreadable skipped%s",
    split,
    len(keys),
    ", ".join(f"{name}={count}" for name, count in counts.items()),
    num_bytes / 1e6,
    num_shards,
    len(skipped),
    f": {skipped}" if skipped else "",
  )
  return {
    "num_records": len(keys),
    "counts": counts,
    "skipped": skipped,
    "num_bytes": num_bytes,
    "index": f"{split}/{INDEX_NAME}",
    "shards": [f"{split}/{name}" for name in names],
  }


def _staging_folder(out: str) -> epath.Path:
  """A hidden sibling of a local DST (same file system, so the final rename is atomic), else a local temp dir."""
  if not workdir.is_url(out):
    dst = workdir.absolute(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
  return epath.Path(tempfile.mkdtemp(prefix="flax_detector_prepare_"))


def _publish(staging: epath.Path, out: str, manifest: dict[str, Any]) -> None:
  """Moves the finished staging folder to DST; prepared.json arrives last on a remote DST."""
  dst = epath.Path(out)
  if dst.exists():
    (dst / MANIFEST_NAME).unlink(missing_ok=True)  # first, so a failed replacement never looks complete
    dst.rmtree()
  if not workdir.is_url(out):
    staging.rename(dst)
    return
  files = [name for entry in manifest["splits"].values() for name in (*entry["shards"], entry["index"])]
  for name in [*files, MANIFEST_NAME]:
    (dst / name).parent.mkdir(parents=True, exist_ok=True)
    (staging / name).copy(dst / name, overwrite=True)


def prepare(
  data_dir: str,
  out: str,
  class_names: Sequence[str],
  num_shards: int | None = None,
  overwrite: bool = False,
  num_threads: int = 16,
) -> dict[str, Any]:
  """Writes the prepared copy of data_dir to out and returns its prepared.json content."""
  start = time.monotonic()
  class_names = list(class_names)
  _check_destination(data_dir, out, overwrite)
  sources = _index(data_dir, class_names)
  staging = _staging_folder(out)
  try:
    staging.mkdir(parents=True, exist_ok=True)
    splits = {
      split: _write_split(
        source, split, class_names, staging, num_shards or default_num_shards(len(source)), num_threads
      )
      for split, source in sources.items()
    }
    manifest = {
      "version": FORMAT_VERSION,
      "record_format": RECORD_FORMAT,
      "class_names": class_names,
      "source": data_dir,
      "splits": splits,
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _publish(staging, out, manifest)
  finally:
    if staging.exists():
      staging.rmtree()
  skipped = sum(len(entry["skipped"]) for entry in splits.values())
  logging.info(
    "Prepared %s from %s in %.1f s: %s; %d unreadable file(s) skipped",
    out,
    data_dir,
    time.monotonic() - start,
    ", ".join(f"{split}={entry['num_records']}" for split, entry in splits.items()),
    skipped,
  )
  return manifest


def _define_flags() -> None:
  """Defined only when run as a program, so that importing prepare() defines no flags."""
  flags.DEFINE_string("data_dir", None, "Image folder holding train/<class>/... and test/<class>/... (local or gs://).")
  flags.DEFINE_string("out", None, "Folder to write the prepared copy to (local or gs://); must be empty or absent.")
  flags.DEFINE_integer(
    "num_shards", None, "Shards per split; default about one per 1000 images, at least 1.", lower_bound=1
  )
  flags.DEFINE_list(
    "class_names",
    ["human-art", "ai-generated"],
    "Class folders in label order; must equal the training config's data.class_names.",
  )
  flags.DEFINE_bool("overwrite", False, "Replace --out when it is not empty.")
  flags.DEFINE_integer(
    "num_threads", 16, "Files read and checked in parallel (reading from a bucket is latency-bound).", lower_bound=1
  )
  flags.mark_flags_as_required(["data_dir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  options = flags.FLAGS
  try:
    prepare(
      options.data_dir, options.out, options.class_names, options.num_shards, options.overwrite, options.num_threads
    )
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)  # A path or setting the person can fix: exit 2, as main, audit, evaluate and predict do.


if __name__ == "__main__":
  _define_flags()
  app.run(main)
