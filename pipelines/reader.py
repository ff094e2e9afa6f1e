"""tf.data over converted shards: ``CriteoDataset(path).dataset(split, batch_size, seed)``.

Records are decoded a block at a time (batch before parsing), shuffled by block windows,
and resumable at any batch.  See docs/data.md.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.pipelines.batching import batches_per_epoch, rebatch
from tfdlrm.pipelines.features import NUM_DENSE
from tfdlrm.pipelines.manifest import ROW_WORDS, read_manifest, row_layout

SHUFFLE_BLOCKS = 32
WINDOW_BLOCKS = 8
READ_BUFFER = 4 << 20
INTERLEAVE_FILES = 4


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
        self.multi_hot = any(w > 1 for w in self.widths) or any(
            c.get("multi_hot") for c in (self.manifest.get("features") or {}).get("columns", ()))

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


def _permute(rows: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(rows, seed=seed)
