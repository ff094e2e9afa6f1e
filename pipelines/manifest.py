"""The on-disk format of a converted dataset, read and written in one place.

A dataset directory holds ``manifest.json`` (format, splits, shards, mapping, counts),
TFRecord shards whose records are blocks of rows of int32 words (label and dense as
float32 bits, then ids: Criteo's 40 words are the label, 13 dense and 26 ids; your own
features' come from the feature spec in the manifest, :func:`row_layout`), and
``vocabulary/``.  See docs/data.md.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import numpy as np

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import NUM_CATEGORICAL, NUM_DENSE, NUM_FIELDS

FORMAT_NAME = "tfdlrm.criteo"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROW_WORDS = NUM_FIELDS  # 40 four-byte words a row
ROW_BYTES = 4 * ROW_WORDS
DEFAULT_BLOCK_ROWS = 4096
DEFAULT_SHARD_ROWS = 1 << 20
SPLITS = ("train", "val", "test")


def pack_rows(label: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int32 [n, 40] rows in the record layout (label and dense as float32 bits)."""
    rows = np.empty((len(label), ROW_WORDS), np.int32)
    as_float = rows.view(np.float32)
    as_float[:, 0] = label
    as_float[:, 1:1 + NUM_DENSE] = dense
    rows[:, 1 + NUM_DENSE:] = ids
    return rows


class SplitWriter:
    """Rows of one split -> ``{split}-NNNNN.tfrecord`` shards of block records."""

    def __init__(self, directory: Path, split: str, rows_per_shard: int, rows_per_block: int):
        import tensorflow as tf

        self._tf = tf
        self.directory, self.split = directory, split
        self.rows_per_block = rows_per_block
        self.rows_per_shard = max(1, math.ceil(rows_per_shard / rows_per_block)) * rows_per_block
        self.files: list[dict] = []
        self.rows = 0
        self._writer = None
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._shard_rows = 0

    def write(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self._pending.append(rows)
        self._pending_rows += len(rows)
        if self._pending_rows >= self.rows_per_block:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending_rows:
            return
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        whole = len(data) if final else (len(data) // self.rows_per_block) * self.rows_per_block
        for start in range(0, whole, self.rows_per_block):
            self._write_block(data[start:start + self.rows_per_block])
        rest = data[whole:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def _write_block(self, block: np.ndarray) -> None:
        if self._writer is None:
            name = f"{self.split}-{len(self.files):05d}.tfrecord"
            self._writer = self._tf.io.TFRecordWriter(str(self.directory / name))
            self.files.append({"path": name, "rows": 0, "blocks": 0, "bytes": 0})
        self._writer.write(np.ascontiguousarray(block, "<i4").tobytes())
        entry = self.files[-1]
        entry["rows"] += len(block)
        entry["blocks"] += 1
        self.rows += len(block)
        self._shard_rows += len(block)
        if self._shard_rows >= self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            entry = self.files[-1]
            entry["bytes"] = os.path.getsize(self.directory / entry["path"])
            self._shard_rows = 0

    def close(self) -> None:
        self._flush(final=True)
        self._close_shard()


def row_layout(manifest: dict) -> tuple[int, tuple]:
    """``(num_dense, widths)`` of a dataset's rows: after the label, ``num_dense`` float32
    words, then per categorical feature ``width`` int32 ids (1; a multi-hot bag: padded
    with -1).  Criteo's: 13 and 26 ones; your own features': from the feature spec."""
    features = manifest.get("features")
    if features is None:
        return NUM_DENSE, (1,) * NUM_CATEGORICAL
    return len(features["spec"]["dense"]), tuple(int(c["width"]) for c in features["columns"])


def manifest_json(manifest: dict) -> str:
    """JSON, indented, with lists of plain values kept on one line."""
    token = uuid.uuid4().hex
    flat: dict = {}

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            if all(not isinstance(v, (dict, list)) for v in value):
                key = f"{token}-{len(flat)}"
                flat[key] = json.dumps(value)
                return key
            return [walk(v) for v in value]
        return value

    text = json.dumps(walk(manifest), indent=1)
    for key, compact in flat.items():
        text = text.replace(f'"{key}"', compact, 1)
    return text + "\n"


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a converted dataset, checked: format, version, and its files present."""
    return read_manifest(Path(path))[0]


def read_manifest(root: Path, check_files: bool = True) -> tuple[dict, bytes]:
    """``(manifest, its bytes)``, checked: format, version, record layout and, with
    ``check_files``, every shard present at its recorded size."""
    file = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root} is not a directory (a converted Criteo dataset is a directory with {MANIFEST})")
    if not file.is_file():
        raise UserError(f"{root} is not a converted Criteo dataset: {MANIFEST} not found "
                        f"(convert raw files with `python -m tfdlrm convert`)")
    try:
        raw = file.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{file} is not a tfdlrm Criteo manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{root} has schema version {version}; this tfdlrm reads version {SCHEMA_VERSION} "
                        f"(convert the raw files again)")
    try:
        record = manifest["record"]
        num_dense, widths = row_layout(manifest)
        if record["bytes_per_row"] != 4 * (1 + num_dense + sum(widths)) or record["byte_order"] != "little":
            raise UserError(f"{root}: unsupported record layout {record}")
        if len(manifest["table_sizes"]) != len(widths):
            raise UserError(f"{root}: manifest has {len(manifest['table_sizes'])} table sizes, "
                            f"expected {len(widths)}")
        for split, info in (manifest["splits"].items() if check_files else ()):
            for entry in info["files"]:
                shard = root / entry["path"]
                if not shard.is_file():
                    raise UserError(f"{root} is damaged: {entry['path']} (of the {split} split) is missing")
                if shard.stat().st_size != entry["bytes"]:
                    raise UserError(f"{root} is damaged: {entry['path']} has {shard.stat().st_size:,} bytes, "
                                    f"the manifest says {entry['bytes']:,}")
    except (KeyError, TypeError) as e:
        raise UserError(f"{file} is incomplete or damaged (missing {e})") from None
    return manifest, raw
