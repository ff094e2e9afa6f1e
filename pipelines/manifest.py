"""The on-disk format of a converted dataset, read and written in one place.

A dataset directory holds ``manifest.json`` (format, splits, shards, mapping, counts),
TFRecord shards whose records are blocks of rows of int32 words (label and dense as
float32 bits, then ids: Criteo's 40 words are the label, 13 dense and 26 ids; your own
features' come from the feature spec in the manifest, :func:`row_layout`), and
``vocabulary/``.  Every shard and vocabulary file is listed with its size and sha256
(datasets converted before that have neither: their checks fall back to the TFRecord
checksums).  See docs/data.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

import numpy as np

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import (
    CATEGORICAL_NAMES,
    NUM_CATEGORICAL,
    NUM_DENSE,
    NUM_FIELDS,
)

FORMAT_NAME = "tfdlrm.criteo"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROW_WORDS = NUM_FIELDS  # 40 four-byte words a row
ROW_BYTES = 4 * ROW_WORDS
DEFAULT_BLOCK_ROWS = 4096
DEFAULT_SHARD_ROWS = 1 << 20
SPLITS = ("train", "val", "test")
# A TFRecord record is framed by 16 bytes: the data's length (uint64), a CRC of the length
# (uint32), the data, a CRC of the data (uint32).  A shard of ``blocks`` records holding
# ``rows`` rows therefore has exactly ``16 * blocks + rows * bytes_per_row`` bytes.
RECORD_OVERHEAD = 16
HASH_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file (as the manifest records it)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def bytes_digest(data: bytes) -> dict:
    """:func:`file_digest` of a file that will hold ``data``."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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
            entry.update(file_digest(self.directory / entry["path"]))  # bytes and sha256, read back from disk
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
    """``(manifest, its bytes)``, checked: format, version, record layout, every file it names
    inside ``root`` (a relative path without ``..``), each shard's rows, blocks and bytes
    consistent with the layout and, with ``check_files``, every shard present (not a link out
    of ``root``) at its recorded size, its first and last record the recorded size.  Checksums
    are not read here (:func:`verify_shard`, :func:`check_vocabulary`)."""
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
        rows_per_block = record["rows_per_block"]
        if not _is_count(rows_per_block) or rows_per_block <= 0:
            raise UserError(f"{file} is damaged: rows_per_block is {rows_per_block!r}")
        if len(manifest["table_sizes"]) != len(widths):
            raise UserError(f"{root}: manifest has {len(manifest['table_sizes'])} table sizes, "
                            f"expected {len(widths)}")
        seen: set = set()
        for split, info in manifest["splits"].items():
            for entry in info["files"]:
                _check_entry(root, split, entry, rows_per_block, record["bytes_per_row"], seen)
            listed = sum(entry["rows"] for entry in info["files"])
            if listed != info["rows_written"]:
                raise UserError(f"{file} is damaged: the {split} split's files hold {listed:,} rows, "
                                f"its rows_written says {info['rows_written']:,}")
        for entry in vocabulary_records(manifest):
            dataset_file(root, entry["path"], "a vocabulary file")
            _check_digest_fields(root, entry)
        folder = (manifest.get("mapping") or {}).get("vocabulary_dir")
        if folder is not None:
            dataset_file(root, folder, "the vocabulary directory")
        for split, info in (manifest["splits"].items() if check_files else ()):
            for entry in info["files"]:
                shard = dataset_file(root, entry["path"], f"a shard of the {split} split")
                if not shard.is_file():
                    raise UserError(f"{root} is damaged: {entry['path']} (of the {split} split) is missing")
                check_inside(root, shard, entry["path"])
                if shard.stat().st_size != entry["bytes"]:
                    raise UserError(f"{root} is damaged: {entry['path']} has {shard.stat().st_size:,} bytes, "
                                    f"the manifest says {entry['bytes']:,}")
                problem = record_problem(shard, entry, rows_per_block, record["bytes_per_row"], every=False)
                if problem:
                    raise UserError(f"{root} is damaged: {entry['path']} {problem}")
    except (KeyError, TypeError) as e:
        raise UserError(f"{file} is incomplete or damaged (missing {e})") from None
    return manifest, raw


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shard_bytes(rows: int, blocks: int, bytes_per_row: int) -> int:
    """The size of a shard of ``blocks`` records holding ``rows`` rows."""
    return RECORD_OVERHEAD * blocks + rows * bytes_per_row


def _check_entry(root: Path, split: str, entry: dict, rows_per_block: int, bytes_per_row: int, seen: set) -> None:
    """One shard's manifest entry: a path inside ``root`` (listed once), and rows, blocks and
    bytes that the record layout can hold (whole blocks but the last)."""
    path = entry["path"]
    dataset_file(root, path, f"a shard of the {split} split")
    key = os.path.normpath(path)
    if key in seen:
        raise UserError(f"{root / MANIFEST} is damaged: it lists {path} twice")
    seen.add(key)
    rows, blocks, size = entry["rows"], entry["blocks"], entry["bytes"]
    if not (_is_count(rows) and _is_count(blocks) and _is_count(size) and rows > 0
            and blocks == math.ceil(rows / rows_per_block) and size == shard_bytes(rows, blocks, bytes_per_row)):
        raise UserError(f"{root / MANIFEST} is damaged: it lists {path} with {rows!r} rows in {blocks!r} records "
                        f"of {size!r} bytes, which blocks of {rows_per_block:,} rows of {bytes_per_row} bytes "
                        f"cannot be")
    _check_digest_fields(root, entry)


def _check_digest_fields(root: Path, entry: dict) -> None:
    digest = entry.get("sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise UserError(f"{root / MANIFEST} is damaged: the sha256 of {entry['path']} is {digest!r}")
    if "sha256" in entry and not _is_count(entry.get("bytes")):
        raise UserError(f"{root / MANIFEST} is damaged: the size of {entry['path']} is {entry.get('bytes')!r}")


def dataset_file(root: Path, path, what: str) -> Path:
    """``root / path`` for a file that the manifest names; refused unless the path stays
    inside ``root`` (relative, no ``..``).  Links are checked by :func:`check_inside`."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        raise UserError(f"{root / MANIFEST} is damaged: {what} has the path {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or os.path.isabs(path):
        raise UserError(f"{root / MANIFEST} names {what} {path!r}, outside the dataset directory: a dataset's "
                        f"files must be inside it (relative paths without '..'); the manifest is damaged or "
                        f"not from tfdlrm convert")
    return root.joinpath(*pure.parts)


def check_inside(root: Path, file: Path, path: str) -> None:
    """Refuse ``file`` when links take it out of ``root`` (the dataset directory)."""
    try:
        resolved = file.resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError) as e:  # a loop of links
        raise UserError(f"{root} is damaged: {path} cannot be resolved ({e})") from None
    if not inside:
        raise UserError(f"{root} is damaged: {path} is a link to {resolved}, outside the dataset directory "
                        f"(a dataset's files must be inside it)")


def record_problem(path: Path, entry: dict, rows_per_block: int, bytes_per_row: int, every: bool) -> Optional[str]:
    """What is wrong with the record headers of a shard (its first and last record; with
    ``every``, all of them), or None: each record must hold the next block of the entry's rows."""
    stride = RECORD_OVERHEAD + rows_per_block * bytes_per_row
    blocks, rows = entry["blocks"], entry["rows"]
    try:
        with open(path, "rb") as f:
            for i in (range(blocks) if every else sorted({0, blocks - 1})):
                f.seek(i * stride)
                head = f.read(8)
                expected = min(rows_per_block, rows - i * rows_per_block) * bytes_per_row
                length = int.from_bytes(head, "little") if len(head) == 8 else None
                if length != expected:
                    said = "ends before it" if length is None else f"says {length:,} bytes"
                    return (f"is not the shard the conversion wrote: record {i + 1:,} of {blocks:,} (byte "
                            f"{i * stride:,}) should hold {expected:,} bytes of rows, its header {said}")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return None


def vocabulary_records(manifest: dict) -> list:
    """The manifest's ``vocabulary_files`` (path, bytes, sha256); empty for datasets converted
    before they were recorded, and for hashing."""
    records = manifest.get("vocabulary_files") or []
    if not isinstance(records, list) or not all(isinstance(r, dict) and "path" in r for r in records):
        raise UserError(f"the manifest's vocabulary_files is damaged: {str(records)[:80]}")
    return records


def vocabulary_paths(manifest: dict) -> list[str]:
    """The vocabulary files a dataset's mapping reads (paths relative to the dataset), from
    the manifest's records or, for datasets converted before those, from its mapping."""
    if manifest.get("vocabulary_files") is not None:
        return [r["path"] for r in vocabulary_records(manifest)]
    features = manifest.get("features")
    if features is not None:
        return [f"vocabulary/{c['name']}.txt" for c in features["columns"] if c.get("kind") == "vocabulary"]
    mapping = manifest.get("mapping") or {}
    if mapping.get("categorical") != "vocabulary":
        return []
    return [f"{mapping.get('vocabulary_dir') or 'vocabulary'}/{name}.txt" for name in CATEGORICAL_NAMES]


def check_vocabulary(root: Path, manifest: dict) -> tuple[list, bool]:
    """``(records, verified)``: each vocabulary file's path, bytes and sha256 as they are on
    disk, checked against the manifest's (``verified``; False for a dataset converted before
    they were recorded).  A missing file, a link out of ``root`` or a changed one is a UserError:
    a vocabulary changed after conversion shifts the ids that the shards were written with."""
    recorded = {r["path"]: r for r in vocabulary_records(manifest)}
    out = []
    for path in vocabulary_paths(manifest):
        file = dataset_file(root, path, "a vocabulary file")
        if not file.is_file():
            raise UserError(f"{root} is damaged: the vocabulary file {path} is missing")
        check_inside(root, file, path)
        try:
            found = {"path": path, **file_digest(file)}
        except OSError as e:
            raise UserError(f"cannot read {file}: {e.strerror or e}") from None
        want = recorded.get(path)
        if want is not None and (found["bytes"], found["sha256"]) != (want.get("bytes"), want.get("sha256")):
            size = (f"; {found['bytes']:,} bytes, the manifest says {want.get('bytes'):,}"
                    if found["bytes"] != want.get("bytes") else "")
            raise UserError(f"{root} is damaged: {path} is not the vocabulary the conversion wrote (its sha256 "
                            f"differs from the manifest's{size}), so its ids would not be the ones the shards "
                            f"hold; convert the data again (or restore the file)")
        out.append(found)
    return out, manifest.get("vocabulary_files") is not None


def verify_shard(root: Path, entry: dict) -> Optional[str]:
    """None when the shard's sha256 is the manifest's, else what differs (the size, or the
    content).  Entries without a sha256 (older datasets) are not checked here: None."""
    if entry.get("sha256") is None:
        return None
    file = dataset_file(root, entry["path"], "a shard")
    try:
        found = file_digest(file)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if found["bytes"] != entry["bytes"]:
        return f"has {found['bytes']:,} bytes, the manifest says {entry['bytes']:,}"
    if found["sha256"] != entry["sha256"]:
        return "is not the file the conversion wrote (its sha256 differs from the manifest's)"
    return None


def shard_entries(manifest: dict, splits: Optional[Iterable[str]] = None) -> list:
    """``(split, entry)`` for the shards of ``splits`` (default: every split), in manifest order."""
    wanted = manifest["splits"] if splits is None else splits
    return [(split, entry) for split in wanted for entry in manifest["splits"][split]["files"]]
