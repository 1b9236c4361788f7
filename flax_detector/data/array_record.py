"""A prepared image folder (ArrayRecord shards written by `flax_detector.prepare`) as a random-access source.

Reading ~22k small files per epoch from a bucket is slow; a few large ArrayRecord shards with an index
are read with one ranged request per record. The records keep the original encoded file bytes, so
decoding gives the same pixels as the image folder, and the original relative paths as keys, so the
validation split carved by a hash of the key is the same from either source.

Layout of a prepared folder DST:

  DST/prepared.json                                   written last: its presence marks DST complete
  DST/<split>/index.json                              {"keys": [...], "labels": [...]} in record order
  DST/<split>/<split>-00000-of-0000N.array_record     the records, in ImageFolderSource's order

Record format, version 1 (one ArrayRecord record per image, no dependency beyond json and struct):

  bytes [0, 4)        magic b"FDR1"
  bytes [4, 8)        H, the header length, uint32 little-endian
  bytes [8, 8 + H)    header, UTF-8 JSON {"key": "<path relative to the source folder>", "label": <int>}
  bytes [8 + H, end)  the original encoded file, byte for byte
"""

import json
import struct
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from etils import epath

from flax_detector.data.decode import decode_image

FORMAT_VERSION = 1
MANIFEST_NAME = "prepared.json"
INDEX_NAME = "index.json"
SHARD_SUFFIX = ".array_record"
RECORD_MAGIC = b"FDR1"
_LENGTH = struct.Struct("<I")
RECORD_FORMAT = (
  'b"FDR1" + uint32 little-endian header length H + H bytes of UTF-8 JSON {"key", "label"} '
  "+ the original encoded file bytes"
)


def encode_record(key: str, label: int, data: bytes) -> bytes:
  """Packs one image file into a record: magic, header length, JSON header, original bytes."""
  # ensure_ascii: a key from a file name that is not valid UTF-8 (lone surrogates) still encodes.
  header = json.dumps({"key": key, "label": int(label)}).encode("utf-8")
  return RECORD_MAGIC + _LENGTH.pack(len(header)) + header + data


def decode_record(record: bytes) -> tuple[str, int, bytes]:
  """Unpacks a record into (key, label, original file bytes); raises ValueError on a foreign record."""
  if record[:4] != RECORD_MAGIC or len(record) < 8:
    raise ValueError(
      f"not a flax_detector image record (starts with {record[:8]!r}); the shard was not written "
      f"by this version of flax_detector.prepare"
    )
  (header_length,) = _LENGTH.unpack_from(record, 4)
  header = json.loads(record[8 : 8 + header_length].decode("utf-8"))
  return header["key"], int(header["label"]), record[8 + header_length :]


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def is_prepared(data_dir: str) -> bool:
  """True when data_dir holds prepared.json, i.e. a complete `flax_detector.prepare` output."""
  return (epath.Path(data_dir) / MANIFEST_NAME).exists()


def read_manifest(data_dir: str, class_names: Sequence[str]) -> dict[str, Any]:
  """Loads prepared.json and checks it fits this code and this config, so a mismatch fails at start-up."""
  path = epath.Path(data_dir) / MANIFEST_NAME
  if not path.exists():
    raise FileNotFoundError(
      f"{path}: missing, so data.dir={data_dir} is not a complete prepared folder; "
      f"(re-)run python -m flax_detector.prepare --data_dir=SRC --out={data_dir}"
    )
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error}); re-run flax_detector.prepare with --overwrite") from error
  version = manifest.get("version")
  if version != FORMAT_VERSION:
    raise ValueError(
      f"{path}: format version {version!r}, but this code reads version {FORMAT_VERSION}; "
      f"re-run flax_detector.prepare with --overwrite"
    )
  prepared_classes = list(manifest.get("class_names", []))
  if prepared_classes != list(class_names):
    raise ValueError(
      f"{path}: prepared with class_names={prepared_classes}, but data.class_names="
      f"{list(class_names)}; set --config.data.class_names={','.join(prepared_classes)} or re-run "
      f"flax_detector.prepare with --class_names={','.join(class_names)} --overwrite"
    )
  return manifest


class ArrayRecordImageSource:
  """One split of a prepared folder; a record is read and decoded only when accessed.

  Picklable for Grain workers: grain's ArrayRecordDataSource drops its open readers when pickled and
  reopens them lazily in the worker.
  """

  def __init__(self, data_dir: str, split: str, class_names: Sequence[str]):
    root = epath.Path(data_dir)
    manifest = read_manifest(data_dir, class_names)
    splits = manifest.get("splits", {})
    if split not in splits:
      raise ValueError(
        f"{root / MANIFEST_NAME}: no split {split!r} (has {sorted(splits)}); re-run "
        f"flax_detector.prepare with --overwrite on a source holding {split}/"
      )
    entry = splits[split]
    index = json.loads((root / entry["index"]).read_text())
    self.keys: list[str] = list(index["keys"])
    self.labels = np.asarray(index["labels"], np.int32)
    # Written by prepare since the folder index probes sizes; older prepared folders lack them.
    self.sizes = np.asarray(index["sizes"], np.int64).reshape(-1, 2) if "sizes" in index else None
    self._split = split
    self._records = grain.sources.ArrayRecordDataSource([str(root / name) for name in entry["shards"]])
    if not len(self._records) == len(self.keys) == len(self.labels) == entry["num_records"]:
      raise ValueError(
        f"{root / split}: shards hold {len(self._records)} records, {root / entry['index']} "
        f"{len(self.keys)} keys and {len(self.labels)} labels, prepared.json says "
        f"{entry['num_records']}; the folder is damaged: re-run flax_detector.prepare --overwrite"
      )
    logging.info(
      "%s: %d prepared records in %d shards (prepared.json found)", root / split, len(self.keys), len(entry["shards"])
    )

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.image(index), int(self.labels[index])

  def image(self, index: int, shorter_side: int | None = None) -> np.ndarray:
    key, _, data = decode_record(self._records[index])
    if key != self.keys[index]:
      raise ValueError(
        f"{self._split} record {index} holds {key}, but the index says {self.keys[index]}: the "
        f"shards and index.json come from different runs; re-run flax_detector.prepare --overwrite"
      )
    return decode_image(data, key, shorter_side)
