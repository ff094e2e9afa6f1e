"""tf.data over converted shards: ``CriteoDataset(path).dataset(split, batch_size, seed)``.

Records are decoded a block at a time (batch before parsing), shuffled by block windows,
and resumable at any batch.  See docs/data.md.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError, io_error_text
from tfdlrm.pipelines.batching import batches_per_epoch, rebatch
from tfdlrm.pipelines.features import NUM_DENSE
from tfdlrm.pipelines.manifest import (
    RECORD_OVERHEAD,
    ROW_WORDS,
    check_vocabulary,
    dataset_file,
    read_manifest,
    record_problem,
    row_layout,
    shard_entries,
    verify_shard,
)

SHUFFLE_BLOCKS = 32
WINDOW_BLOCKS = 8
READ_BUFFER = 4 << 20
INTERLEAVE_FILES = 4
FIX = "convert the data again (or restore the file from a copy)"


def decode_block(record: tf.Tensor, words: int = ROW_WORDS) -> tf.Tensor:
    """One record -> int32 [rows, words] (Criteo: 40)."""
    return tf.reshape(tf.io.decode_raw(record, tf.int32, little_endian=True), [-1, words])


def to_batch(rows: tf.Tensor, num_dense: int = NUM_DENSE):
    """int32 [batch, words] -> ``({"dense": float32 [batch, num_dense], "sparse": int64 [batch, words - 1 - num_dense]},
    float32 [batch, 1])`` (multi-hot bags still padded with -1: :func:`bags`)."""
    label = tf.bitcast(rows[:, :1], tf.float32)
    dense = tf.bitcast(rows[:, 1:1 + num_dense], tf.float32)
    sparse = tf.cast(rows[:, 1 + num_dense:], tf.int64)
    return {"dense": dense, "sparse": sparse}, label


def bags(widths: tuple):
    """A map from padded ids ``[batch, sum(widths)]`` (-1 = padding) to ragged
    ``[batch, tables, None]``: table ``f`` owns ``widths[f]`` consecutive words."""
    owner = tf.constant(np.repeat(np.arange(len(widths)), widths), tf.int32)

    def to_ragged(features, label):
        ids = features["sparse"]
        present = ids >= 0
        batch = tf.shape(ids)[0]
        lengths = tf.math.unsorted_segment_sum(tf.transpose(tf.cast(present, tf.int64)), owner, len(widths))
        bags_ = tf.RaggedTensor.from_row_lengths(
            tf.boolean_mask(ids, present),  # row-major: example, then table, then position
            tf.reshape(tf.transpose(lengths), [-1]))
        sparse = tf.RaggedTensor.from_uniform_row_length(bags_, len(widths), nrows=tf.cast(batch, tf.int64))
        return {"dense": features["dense"], "sparse": sparse}, label

    return to_ragged


class CriteoDataset:
    """A converted dataset directory: its manifest, and tf.data pipelines over its splits."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.manifest, raw = read_manifest(self.path)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.table_sizes = tuple(int(n) for n in self.manifest["table_sizes"])
        self.rows_per_block = int(self.manifest["record"]["rows_per_block"])
        self.num_dense, self.widths = row_layout(self.manifest)
        self.words = 1 + self.num_dense + sum(self.widths)
        # a multi-hot column gives ragged bags, whatever its width (an empty bag is all padding)
        self.multi_hot = any(c["multi_hot"] for c in (self.manifest.get("features") or {}).get("columns", ()))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def rows(self, split: str) -> int:
        return int(self._split(split)["rows_written"])

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise UserError(f"{self.path} has no {split!r} split (it has: {', '.join(self.splits)})") from None

    # -- integrity (docs/data.md, Criteo data, **Integrity**) ------------------------------
    def verify(self, splits: Optional[Sequence[str]] = None, vocabulary: bool = False) -> list[str]:
        """Check every shard of ``splits`` (default: all) in full, and with ``vocabulary`` the
        vocabulary files: sha256 against the manifest's (a dataset converted before they were
        recorded: every record header, and every record's TFRecord checksum, by reading it).
        Raises a UserError naming the first damaged file (and record, where it can tell);
        returns notes on what could not be checked."""
        splits = list(self.splits if splits is None else splits)
        for split in splits:
            self._split(split)
        entries = shard_entries(self.manifest, splits)
        for split, entry in entries:
            problem = self.shard_problem(entry, split)
            if problem:
                raise UserError(f"{problem}; {FIX}")
        notes = []
        if any(entry.get("sha256") is None for _, entry in entries):
            notes.append(f"{self.path} was converted without sha256 checksums (by an older tfdlrm): its "
                         f"{'/'.join(splits)} shards were checked by their TFRecord checksums instead; "
                         f"convert again to record them")
        if vocabulary:
            records, verified = check_vocabulary(self.path, self.manifest)
            if records and not verified:
                notes.append(f"{self.path} has no sha256 of its vocabulary files (converted by an older tfdlrm): "
                             f"they were not checked")
        return notes

    def shard_problem(self, entry: dict, split: str) -> Optional[str]:
        """What is wrong with one shard, as a sentence naming it (and the record, where the
        damage is in one), or None: present, at its size, its sha256 the manifest's (where
        recorded), every record header and every record's TFRecord checksum right."""
        file = dataset_file(self.path, entry["path"], "a shard")
        name = f"{file} ({split} split)"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} is damaged: it has {file.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}"
        differs = verify_shard(self.path, entry)
        if entry.get("sha256") is not None and differs is None:
            return None
        bytes_per_row = 4 * self.words
        layout = record_problem(file, entry, self.rows_per_block, bytes_per_row, every=True)
        if layout:
            return f"{name} {layout}"
        try:
            tf.data.TFRecordDataset(str(file)).reduce(np.int64(0), lambda n, _: n + 1)
        except tf.errors.DataLossError as e:
            return f"{name} is damaged: {self._record_at(e, entry, bytes_per_row)}"
        except tf.errors.OpError as e:
            return f"{name} cannot be read: {read_error_text(e)}"
        if differs:
            return (f"{name} {differs}, though its records read as valid: a shard of another dataset, or "
                    f"edited after conversion")
        return None

    def _record_at(self, error: tf.errors.OpError, entry: dict, bytes_per_row: int) -> str:
        """Which record (and rows of the file) a TFRecord DataLossError is in."""
        message = read_error_text(error)
        found = re.search(r"record at (\d+)", message)
        if not found:
            return f"a record fails its checksum ({message})"
        index = int(found.group(1)) // (RECORD_OVERHEAD + self.rows_per_block * bytes_per_row)
        first = index * self.rows_per_block
        last = min(first + self.rows_per_block, entry["rows"])
        return (f"record {index + 1:,} of {entry['blocks']:,} (rows {first + 1:,}-{last:,} of the file) fails its "
                f"checksum: {message}")

    def damage(self, error: BaseException) -> UserError:
        """The one-line error for a TFRecord read that failed (a ``DataLossError`` from tf.data,
        which may not name the file): the shard and record at fault, found by checking the
        shards now, the held-out splits first."""
        order = [s for s in self.splits if s != "train"] + [s for s in self.splits if s == "train"]
        for split, entry in shard_entries(self.manifest, order):
            problem = self.shard_problem(entry, split)
            if problem:
                return UserError(f"{problem}; {FIX}")
        return UserError(f"a file could not be read ({read_error_text(error)}), though every shard of {self.path} "
                         f"matches its manifest now")

    def _block_rows(self, split: str) -> list[int]:
        """Rows of every block of the split, in file order."""
        sizes = []
        for entry in self._split(split)["files"]:
            full, rest = divmod(entry["rows"], self.rows_per_block)
            sizes += [self.rows_per_block] * full + ([rest] if rest else [])
        return sizes

    def dataset(self, split: str, batch_size: int, seed: Optional[int] = None, start_batch: int = 0,
                input_context: Optional[tf.distribute.InputContext] = None,
                deterministic: bool = True, last_batch: str = "keep") -> tf.data.Dataset:
        """Batches of ``split``: shuffled by ``seed`` (None: file order), starting at batch
        ``start_batch``, only this input pipeline's blocks under ``input_context``; the
        short last batch kept, dropped or folded (pipelines/batching.py)."""
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        info = self._split(split)
        paths = [str(self.path / entry["path"]) for entry in info["files"]]
        pipelines, index = 1, 0
        if input_context is not None and input_context.num_input_pipelines > 1:
            pipelines, index = input_context.num_input_pipelines, input_context.input_pipeline_id
        blocks = self._block_rows(split)[index::pipelines]
        rows = sum(blocks)
        if rows == 0:
            raise UserError(f"input pipeline {index} of {pipelines} gets no rows of the {split} split "
                            f"({len(self._block_rows(split))} blocks): use fewer workers or smaller blocks")
        batches = batches_per_epoch(rows, batch_size, last_batch)
        if not 0 <= start_batch <= batches:
            raise UserError(f"start batch {start_batch} is outside the {batches} batches of the {split} split")

        if seed is not None and pipelines == 1 and len(paths) > 1:
            # Sharded pipelines keep the file order: dealing blocks round-robin over a
            # fixed order is what keeps their rows disjoint and their sizes known.
            files = tf.data.Dataset.from_tensor_slices(paths).shuffle(
                len(paths), seed=seed, reshuffle_each_iteration=True)
            records = files.interleave(
                lambda p: tf.data.TFRecordDataset(p, buffer_size=READ_BUFFER),
                cycle_length=min(len(paths), INTERLEAVE_FILES), block_length=1,
                num_parallel_calls=min(len(paths), INTERLEAVE_FILES), deterministic=True)
        else:
            records = tf.data.TFRecordDataset(paths, buffer_size=READ_BUFFER)
        if pipelines > 1:
            records = records.shard(pipelines, index)
        decode, parse = (lambda r: decode_block(r, self.words)), (lambda rows: to_batch(rows, self.num_dense))
        data = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        if seed is not None:
            data = data.shuffle(SHUFFLE_BLOCKS, seed=seed, reshuffle_each_iteration=True)
            window = WINDOW_BLOCKS * self.rows_per_block
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            data = tf.data.Dataset.zip((data.rebatch(window), seeds)).map(
                lambda rows, s: parse(_permute(rows, s)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic)
        else:
            data = data.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        # Parsed per block or window above; per batch only the slicing of rebatch remains.
        data = rebatch(data, rows, batch_size, last_batch)
        if start_batch:
            data = data.skip(start_batch)
        if self.multi_hot:
            data = data.map(bags(self.widths), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        options = tf.data.Options()
        options.deterministic = deterministic
        return data.with_options(options).prefetch(tf.data.AUTOTUNE)


def read_error_text(error: BaseException) -> str:
    """The message of a TensorFlow read error without the graph trace around it
    (``corrupted record at 20524``)."""
    text = getattr(error, "message", None) or str(error)
    found = re.search(r"(corrupted|truncated) record at \d+", text)
    return found.group(0) if found else io_error_text(error)


def _permute(rows: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(rows, seed=seed)
