"""``python -m tfdlrm convert``: raw Criteo TSV (plain or gzip) -> TFRecord shards + manifest.

Splits
    * ``--format kaggle --input train.txt``: Kaggle's file is 7 equal days by line
      count (as ``np.array_split``: the first ``lines % 7`` days get one more line);
      days 1-6 train, day 7 is held out as ``test``, or with ``--halve-held-out``
      its first half is ``val`` and its second half ``test`` (as the reference DLRM).
    * ``--format terabyte --input day_0 .. day_23``: the day is read from each file's
      name (``day_N``, optionally ``.gz``); days 0-22 train, day 23 held out
      (halved the same way).
    * ``--train FILES --test FILES [--val FILES]``: data already split; no day split.

    The vocabulary (``--min-frequency``) is counted over the training rows only.
    ``--shuffle`` shuffles the training split (external: rows go to random bucket
    files, each bucket is permuted in memory), seeded by ``--seed``.  Held-out
    splits keep their file order.

Passes: a day split that needs line counts (Kaggle; a halved Terabyte day 23)
first counts lines (and takes the sha256).  Every file is then parsed once, by
``--workers`` threads.  With ``--hash-buckets`` rows go straight to their shards.
With a vocabulary, rows are parked on disk with their raw hex values (41 words a
row) while the training values are counted; the vocabulary is then built and a
last pass over the parked rows writes the ids.  Memory stays bounded whatever the
input size: 8 MB chunks, one shuffle bucket (~1M rows), plus the vocabulary.

Output directory (written as ``.NAME.partial-*`` beside it, renamed at the end;
``manifest.json`` is written last, so a directory with a manifest is complete)::

    manifest.json
    train-00000.tfrecord ..     test-00000.tfrecord ..    (val-00000.tfrecord ..)
    vocabulary/C1.txt .. C26.txt                           (vocabulary mode)

Record layout: each TFRecord record is a block of up to ``rows_per_block`` rows
(4096 by default), raw little-endian, row-major, 160 bytes a row::

    int32 word  0       label as float32 (0.0 or 1.0)
    int32 words 1..13   dense features, float32, already transformed (features.py)
    int32 words 14..39  categorical ids, int32

so a reader decodes a whole block with one ``tf.io.decode_raw`` (see reader.py).
Shards hold ``rows_per_shard`` rows (a multiple of the block size); only the last
block of a split is short.

Bad rows (see ``pipelines/tsv.py`` for the grammar): ``--on-bad-row error``
(default) stops at the first one with its file, line number and reason;
``skip`` counts them per split and kind and reports the first few.  Either way
rows read = rows written + rows rejected, per split, in the summary and the
manifest.  Missing, empty, truncated or corrupt (gzip) files always stop the
conversion: a file problem is not a row problem, and rows lost in a truncated
stream could not be counted.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from pipelines.features import (CATEGORICAL_NAMES, DENSE_NAMES, LABEL_NAME, NUM_CATEGORICAL, NUM_DENSE,
                                NUM_FIELDS, CategoricalMapping, check_hash_buckets, check_min_frequency,
                                dense_transform_np)
from pipelines.tsv import BAD_KINDS, ChunkReader, check_input, count_lines, explain_line, is_gzip, parse_chunk
from tfdlrm.errors import UserError, io_error_text

FORMAT_NAME = "tfdlrm.criteo"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROW_WORDS = NUM_FIELDS  # 40 four-byte words a row
ROW_BYTES = 4 * ROW_WORDS
DEFAULT_BLOCK_ROWS = 4096
DEFAULT_SHARD_ROWS = 1 << 20
KAGGLE_DAYS = 7
TERABYTE_DAYS = 24
FORMATS = ("kaggle", "terabyte")
SPLITS = ("train", "val", "test")
BAD_ROW_POLICIES = ("error", "skip")
BAD_ROW_EXAMPLES = 20  # kept in the manifest
SHUFFLE_BUCKET_ROWS = 1 << 20
_TERABYTE_NAME = re.compile(r"day_(\d+)(\.gz)?$")


@dataclass
class ConvertSpec:
    """Everything ``python -m tfdlrm convert`` takes; ``convert(spec)`` runs it.

    Give ``inputs`` (with ``format``) for a day split, or ``train`` and ``test``
    (and optionally ``val``) for data already split.  ``hash_buckets`` or
    ``min_frequency`` chooses the categorical mapping (neither: ``min_frequency=1``,
    every value seen in training gets an id).
    """

    out: str
    inputs: Sequence[str] = ()
    format: str = "kaggle"
    train: Sequence[str] = ()
    val: Sequence[str] = ()
    test: Sequence[str] = ()
    hash_buckets: Optional[int] = None
    min_frequency: Optional[int] = None
    halve_held_out: bool = False
    shuffle: bool = False
    seed: int = 0
    on_bad_row: str = "error"
    rows_per_shard: int = DEFAULT_SHARD_ROWS
    rows_per_block: int = DEFAULT_BLOCK_ROWS
    overwrite: bool = False
    workers: int = 2
    progress: Optional[bool] = None  # None: when stderr is a terminal

    def check(self) -> "ConvertSpec":
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        given = bool(self.train or self.val or self.test)
        if self.inputs and given:
            raise UserError("give either --input (split into days) or --train/--test (already split), not both")
        if not self.inputs and not given:
            raise UserError("nothing to convert: give --input FILE (Kaggle train.txt, Terabyte day_N) "
                            "or --train FILES --test FILES")
        if given and not self.train:
            raise UserError("--test/--val given without --train: the training split needs files")
        if given and not self.test:
            raise UserError("--train given without --test: name the held-out file(s) with --test")
        if given and self.halve_held_out:
            raise UserError("--halve-held-out applies to day splits (--input); give --val and --test instead")
        if self.hash_buckets is not None and self.min_frequency is not None:
            raise UserError("choose one categorical mapping: --hash-buckets N or --min-frequency T, not both")
        if self.hash_buckets is not None:
            check_hash_buckets(self.hash_buckets)
        elif self.min_frequency is not None:
            check_min_frequency(self.min_frequency)
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise UserError(f"--on-bad-row must be one of {', '.join(BAD_ROW_POLICIES)}, got {self.on_bad_row!r}")
        for name in ("rows_per_shard", "rows_per_block", "workers"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.out:
            raise UserError("--out is required: the dataset directory to write")
        return self

    @property
    def mapping_kind(self) -> str:
        return "hash" if self.hash_buckets is not None else "vocabulary"


# -- the plan: which lines of which file go to which split ----------------------------------
@dataclass
class Segment:
    start: int  # first line (0-based), inclusive
    stop: float  # last line, exclusive (inf: to the end of the file)
    split: str


@dataclass
class InputFile:
    path: str
    size: int
    segments: list
    day: Optional[int] = None
    lines: Optional[int] = None  # known after counting (day splits)
    sha256: Optional[str] = None


def _day_sizes(lines: int, days: int) -> list[int]:
    """Lines per day, as ``np.array_split``: the first ``lines % days`` days get one more."""
    base, extra = divmod(lines, days)
    return [base + (1 if d < extra else 0) for d in range(days)]


def held_out_segments(start: int, lines: int, halve: bool) -> list[Segment]:
    """The held-out day's lines: all ``test``, or first half ``val`` and second half ``test``."""
    if not halve:
        return [Segment(start, start + lines, "test")]
    first = (lines + 1) // 2  # np.array_split(day, 2): the first half gets the odd line
    return [Segment(start, start + first, "val"), Segment(start + first, start + lines, "test")]


def kaggle_segments(lines: int, halve: bool) -> list[Segment]:
    """Kaggle's single file: days 1-6 train, day 7 held out."""
    sizes = _day_sizes(lines, KAGGLE_DAYS)
    train = sum(sizes[:-1])
    return [Segment(0, train, "train")] + held_out_segments(train, sizes[-1], halve)


def terabyte_day(path: str) -> int:
    match = _TERABYTE_NAME.search(os.path.basename(path))
    if not match:
        raise UserError(f"{path}: Terabyte files are named day_0 .. day_23 (optionally .gz), "
                        f"which gives each file's day; for other names use --train/--test")
    day = int(match.group(1))
    if not 0 <= day < TERABYTE_DAYS:
        raise UserError(f"{path}: the Terabyte data has days 0 .. 23, not {day}")
    return day


def plan_inputs(spec: ConvertSpec, progress: "Progress") -> list[InputFile]:
    """Check every input and assign its lines to splits (counting lines where the split needs it)."""
    if not spec.inputs:
        files = []
        for split in SPLITS:
            for path in getattr(spec, split):
                files.append(InputFile(path, check_input(path), [Segment(0, math.inf, split)]))
        _no_duplicates(files)
        return files
    paths = list(spec.inputs)
    sizes = [check_input(p) for p in paths]
    if spec.format == "kaggle":
        if len(paths) != 1:
            raise UserError(f"--format kaggle splits one file (Kaggle's train.txt) into 7 days; got {len(paths)} "
                            f"files (use --train/--test for data already split)")
        counted = _count(paths[0], progress)
        if counted.lines < KAGGLE_DAYS * (2 if spec.halve_held_out else 1):
            raise UserError(f"{paths[0]} has {counted.lines} line(s): too few to split into {KAGGLE_DAYS} days")
        return [InputFile(paths[0], sizes[0], kaggle_segments(counted.lines, spec.halve_held_out),
                          lines=counted.lines, sha256=counted.sha256)]
    files = []
    for path, size in zip(paths, sizes):
        files.append(InputFile(path, size, [], day=terabyte_day(path)))
    _no_duplicates(files)
    days = sorted(f.day for f in files)
    if len(set(days)) != len(days):
        raise UserError("two input files name the same Terabyte day: " + ", ".join(f.path for f in files))
    if TERABYTE_DAYS - 1 not in days:
        raise UserError(f"the Terabyte split holds out day {TERABYTE_DAYS - 1}, but no day_{TERABYTE_DAYS - 1} "
                        f"file was given (for other splits use --train/--test)")
    if len(days) < 2:
        raise UserError("the Terabyte split needs training days (day_0 .. day_22) besides day_23")
    files.sort(key=lambda f: f.day)
    for f in files:
        if f.day < TERABYTE_DAYS - 1:
            f.segments = [Segment(0, math.inf, "train")]
        elif spec.halve_held_out:
            counted = _count(f.path, progress)
            if counted.lines < 2:
                raise UserError(f"{f.path} has {counted.lines} line(s): too few to halve")
            f.lines, f.sha256 = counted.lines, counted.sha256
            f.segments = held_out_segments(0, counted.lines, True)
        else:
            f.segments = [Segment(0, math.inf, "test")]
    return files


def _no_duplicates(files: list[InputFile]) -> None:
    seen = {}
    for f in files:
        key = os.path.realpath(f.path)
        if key in seen:
            raise UserError(f"{f.path} is given twice (as {seen[key]} and again): a row would be in two splits")
        seen[key] = f.path


def _count(path: str, progress: "Progress"):
    progress.start(f"counting lines of {os.path.basename(path)}", total_bytes=os.path.getsize(path))
    counted = count_lines(path, on_bytes=progress.at_bytes)
    progress.done()
    return counted


# -- progress --------------------------------------------------------------------------------
class Progress:
    """One stderr line, rewritten at most twice a second: rows, rows/s, percent of bytes."""

    def __init__(self, enabled: Optional[bool] = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = ""
        self.rows = 0
        self.total_bytes = 0
        self.base_bytes = 0
        self.read_bytes = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def start(self, label: str, total_bytes: int) -> None:
        self.label, self.total_bytes = label, total_bytes
        self.rows, self.base_bytes, self.read_bytes = 0, 0, 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def next_file(self) -> None:
        self.base_bytes += self.read_bytes
        self.read_bytes = 0

    def at_bytes(self, n: int) -> None:
        self.read_bytes = n
        self._show()

    def add_rows(self, n: int) -> None:
        self.rows += n
        self._show()

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        seconds = max(now - self.t0, 1e-9)
        pct = 100.0 * (self.base_bytes + self.read_bytes) / self.total_bytes if self.total_bytes else 100.0
        rows = f"{self.rows:,} rows, {self.rows / seconds:,.0f} rows/s, " if self.rows else ""
        self.stream.write(f"\r{self.label}: {rows}{min(pct, 100.0):5.1f}%  {seconds:6.1f} s ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._show(force=True)
            self.stream.write("\n")
            self.stream.flush()


# -- writing -----------------------------------------------------------------------------------
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


class Spool:
    """Rows parked on disk between the passes, optionally shuffled (bounded memory).

    Rows go to one temporary file in order, or (``buckets`` > 1, or ``shuffle``)
    each row to a random one of ``buckets`` files; :meth:`drain` gives them back in
    pieces: in order, or bucket by bucket, each bucket permuted in memory.  Memory:
    one bucket (about ``SHUFFLE_BUCKET_ROWS`` rows).
    """

    def __init__(self, directory: Path, name: str, words: int, shuffle: bool = False, buckets: int = 1,
                 seed: int = 0):
        self.directory = directory / f".spool-{name}"
        self.directory.mkdir()
        self.words = words
        self.shuffle = shuffle
        self.buckets = max(1, buckets) if shuffle else 1
        self.rng = np.random.default_rng([seed, 20191125])
        self.paths = [self.directory / f"{b:04d}.bin" for b in range(self.buckets)]
        self.files = [open(path, "wb") for path in self.paths]
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self.rows += len(rows)
        if self.buckets == 1:
            self.files[0].write(rows.tobytes())
            return
        bucket = self.rng.integers(0, self.buckets, len(rows))
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.buckets + 1))
        ordered = rows[order]
        for b in range(self.buckets):
            if bounds[b + 1] > bounds[b]:
                self.files[b].write(ordered[bounds[b]:bounds[b + 1]].tobytes())

    def drain(self, piece_rows: int = 1 << 17):
        """The rows back, as int32 [n, words] pieces; the files are deleted as they are read."""
        for f in self.files:
            f.close()
        for path in self.paths:
            if self.shuffle:
                rows = np.fromfile(path, np.int32).reshape(-1, self.words)
                rows = rows[self.rng.permutation(len(rows))]
                for start in range(0, len(rows), piece_rows):
                    yield rows[start:start + piece_rows]
            else:
                with open(path, "rb") as f:
                    while True:
                        rows = np.fromfile(f, np.int32, count=piece_rows * self.words)
                        if not len(rows):
                            break
                        yield rows.reshape(-1, self.words)
            path.unlink()
        self.directory.rmdir()


# -- counting values for the vocabulary ------------------------------------------------------
class ValueCounter:
    """Counts of uint32 values, for one feature: sorted runs, merged as they grow."""

    FLUSH = 1 << 20  # pending keys per feature before they are merged (12 MB)

    def __init__(self):
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add counted values (``keys`` unique)."""
        if len(keys):
            self.pending.append((keys, counts))
            self.pending_size += len(keys)
            if self.pending_size >= self.FLUSH:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        run = _merge_counts(self.pending)
        self.pending, self.pending_size = [], 0
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge_counts([a, b]))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, counts)``, values sorted and unique."""
        self._flush()
        if not self.runs:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        return _merge_counts(self.runs) if len(self.runs) > 1 else self.runs[0]


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts]).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts) if len(keys) else counts


# -- one chunk, in a worker thread -------------------------------------------------------------
STAGED_WORDS = ROW_WORDS + 1  # vocabulary mode between the passes: raw values + a missing bitmask
_BITS = (1 << np.arange(NUM_CATEGORICAL)).astype(np.int64)


@dataclass
class ChunkResult:
    lines: int
    read: dict  # split -> lines of the chunk in the split
    rows: dict  # split -> int32 [n, 40] final rows, or [n, 41] staged rows (vocabulary mode)
    counted: Optional[list]  # vocabulary mode: per feature (values, counts) of the training rows
    bad: list  # (line 1-based, split, kind, reason), in line order


def _locate(first_line: int, lines: int, segments: list[Segment]):
    """(split, lo, hi) chunk-relative line ranges of each segment overlapping the chunk."""
    out = []
    for seg in segments:
        lo, hi = max(seg.start, first_line), min(seg.stop, first_line + lines)
        if hi > lo:
            out.append((seg.split, int(lo - first_line), int(hi - first_line)))
    return out


def stage_rows(label, dense, values, missing) -> np.ndarray:
    """int32 [n, 41]: the final layout with raw values for ids, plus a missing bitmask."""
    rows = np.empty((len(label), STAGED_WORDS), np.int32)
    as_float = rows.view(np.float32)
    as_float[:, 0] = label
    as_float[:, 1:1 + NUM_DENSE] = dense_transform_np(dense)
    rows[:, 1 + NUM_DENSE:ROW_WORDS] = values.view(np.int32)
    rows[:, ROW_WORDS] = missing.astype(np.int64) @ _BITS
    return rows


def finish_rows(staged: np.ndarray, mapping: CategoricalMapping) -> np.ndarray:
    """Staged rows -> final rows: raw values become ids."""
    values = staged[:, 1 + NUM_DENSE:ROW_WORDS].view(np.uint32)
    missing = ((staged[:, ROW_WORDS, None].astype(np.int64) & _BITS) != 0)
    rows = staged[:, :ROW_WORDS].copy()
    rows[:, 1 + NUM_DENSE:] = mapping.ids_np(values, missing)
    return rows


def process_chunk(data, first_line: int, segments: list[Segment],
                  mapping: Optional[CategoricalMapping]) -> ChunkResult:
    """Parse a chunk and route its rows to splits: final rows with a mapping; without one
    (vocabulary mode, first pass) staged rows, and the counts of the training rows' values."""
    parsed = parse_chunk(data)
    read, rows, bad = {}, {}, []
    counted = None
    for split, lo, hi in _locate(first_line, parsed.lines, segments):
        read[split] = read.get(split, 0) + hi - lo
        a, b = np.searchsorted(parsed.good, [lo, hi])
        part = parsed.select(slice(a, b))
        if mapping is not None:
            out = pack_rows(part.label, dense_transform_np(part.dense), mapping.ids_np(part.values, part.missing))
        else:
            out = stage_rows(part.label, part.dense, part.values, part.missing)
            if split == "train":
                counted = [np.unique(part.values[:, f][~part.missing[:, f]], return_counts=True)
                           for f in range(NUM_CATEGORICAL)]
        rows[split] = np.concatenate([rows[split], out]) if split in rows else out
        c, d = np.searchsorted(parsed.bad, [lo, hi])
        for i in range(c, d):
            kind, reason = explain_line(parsed.bad_text[i])
            bad.append((first_line + int(parsed.bad[i]) + 1, split, kind, reason))
    return ChunkResult(parsed.lines, read, rows, counted, bad)


# -- the conversion ------------------------------------------------------------------------------
@dataclass
class SplitCounts:
    read: int = 0
    written: int = 0
    rejected: int = 0
    rejected_by_kind: dict = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})

    def to_dict(self) -> dict:
        return {"rows_read": self.read, "rows_written": self.written, "rows_rejected": self.rejected,
                "rejected_by_kind": dict(self.rejected_by_kind)}


@dataclass
class ConversionResult:
    out: str
    manifest: dict
    seconds: float
    rows_read: int

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds else float("nan")

    def summary(self) -> str:
        splits = self.manifest["splits"]
        lines = [f"{'split':6} {'rows read':>12} {'written':>12} {'rejected':>10}  shards"]
        for name, s in splits.items():
            lines.append(f"{name:6} {s['rows_read']:>12,} {s['rows_written']:>12,} {s['rows_rejected']:>10,}  "
                         f"{len(s['files'])}")
        bad = self.manifest["bad_rows"]
        for example in bad["examples"][:5]:
            lines.append(f"skipped {example['file']} line {example['line']:,}: {example['reason']}")
        total_bad = sum(s["rows_rejected"] for s in splits.values())
        if total_bad > 5:
            lines.append(f"... {total_bad:,} bad rows skipped in all (counts by kind in the manifest)")
        mapping = self.manifest["mapping"]
        sizes = self.manifest["table_sizes"]
        lines.append(f"categorical ids: {mapping['categorical']}"
                     + (f" into {mapping['hash_buckets']:,} buckets" if mapping["categorical"] == "hash"
                        else f", min frequency {mapping['min_frequency']}")
                     + f"; tables {min(sizes):,} .. {max(sizes):,} rows ({sum(sizes):,} in all)")
        lines.append(f"wrote {self.out} in {self.seconds:.1f} s: {self.rows_per_second:,.0f} rows/s")
        return "\n".join(lines)


def convert(spec: ConvertSpec, log: Callable[[str], None] = print) -> ConversionResult:
    """Convert raw Criteo TSV to a tfdlrm dataset directory (see the module docstring)."""
    spec.check()
    t0 = time.perf_counter()
    out = Path(spec.out)
    _check_out(out, spec.overwrite)
    progress = Progress(spec.progress)
    files = plan_inputs(spec, progress)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    try:
        with ThreadPoolExecutor(max_workers=spec.workers, thread_name_prefix="convert") as pool:
            mapping, manifest = _convert_files(spec, files, partial, pool, progress)
        mapping.save_vocabulary(partial)
        (partial / MANIFEST).write_text(manifest_json(manifest))
        _replace(partial, out, spec.overwrite)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__module__.startswith("tensorflow"):  # a disk full, a file gone
            raise UserError(f"cannot convert into {out}: {io_error_text(e)} (nothing was written to {out})") from None
        raise
    seconds = time.perf_counter() - t0
    rows_read = sum(s["rows_read"] for s in manifest["splits"].values())
    return ConversionResult(str(out), manifest, seconds, rows_read)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory {out} already exists and is not empty (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def _replace(partial: Path, out: Path, overwrite: bool) -> None:
    """Put the finished dataset at ``out`` (replacing an old one only when allowed)."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            if not overwrite:
                raise UserError(f"output directory {out} appeared during the conversion; not replacing it")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _in_order(pool: ThreadPoolExecutor, jobs, work: Callable, depth: int):
    """``work(*job)`` for each job on the pool, results in job order, at most ``depth`` in flight."""
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.submit(work, *job))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class BadRows:
    """Bad-row policy: stop at the first (error) or count and keep examples (skip)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.examples: list[dict] = []

    def handle(self, path: str, bad: list, counts: dict) -> None:
        for line, split, kind, reason in bad:
            if self.policy == "error":
                raise UserError(f"{path} line {line:,}: {reason} (--on-bad-row skip skips bad rows)")
            c = counts[split]
            c.rejected += 1
            c.rejected_by_kind[kind] += 1
            if len(self.examples) < BAD_ROW_EXAMPLES:
                self.examples.append({"file": path, "line": line, "split": split, "kind": kind, "reason": reason})


def _convert_files(spec: ConvertSpec, files: list[InputFile], directory: Path, pool,
                   progress: Progress) -> tuple[CategoricalMapping, dict]:
    """Parse every file once.  Hashing: rows go straight to their shards (through a
    shuffling spool for a shuffled training split).  Vocabulary: rows are staged
    on disk with their raw values while the training values are counted; then the
    vocabulary is built and a second pass over the staged rows writes the ids."""
    splits = [s for s in SPLITS if any(seg.split == s for f in files for seg in f.segments)]
    writers = {s: SplitWriter(directory, s, spec.rows_per_shard, spec.rows_per_block) for s in splits}
    vocabulary = spec.mapping_kind == "vocabulary"
    mapping = None if vocabulary else CategoricalMapping.hashing(spec.hash_buckets)
    sinks: dict = dict(writers)
    for split in splits:
        shuffle = spec.shuffle and split == "train"
        if vocabulary or shuffle:
            buckets = math.ceil(sum(_estimated_rows(f, split) for f in files) / SHUFFLE_BUCKET_ROWS)
            sinks[split] = Spool(directory, split, STAGED_WORDS if vocabulary else ROW_WORDS, shuffle, buckets,
                                 spec.seed)
    counters = [ValueCounter() for _ in range(NUM_CATEGORICAL)] if vocabulary else None
    counts = {s: SplitCounts() for s in splits}
    bad_rows = BadRows(spec.on_bad_row)
    sources = []
    progress.start("converting" if not vocabulary else "parsing and counting values", sum(f.size for f in files))
    work = lambda data, first, segments: process_chunk(data, first, segments, mapping)
    for f in files:
        reader = ChunkReader(f.path, on_bytes=progress.at_bytes, checksum=f.sha256 is None)
        jobs = ((pieces, first, f.segments) for first, pieces in reader)
        for result in _in_order(pool, jobs, work, spec.workers + 1):
            bad_rows.handle(f.path, result.bad, counts)
            for split, n in result.read.items():
                counts[split].read += n
            for split, rows in result.rows.items():
                sinks[split].write(rows)
                counts[split].written += len(rows)
            if result.counted is not None:
                for counter, (keys, n) in zip(counters, result.counted):
                    counter.add(keys, n)
            progress.add_rows(result.lines)
        progress.next_file()
        if f.lines is not None and f.lines != reader.lines:
            raise UserError(f"{f.path} changed while it was being converted ({f.lines:,} lines, then "
                            f"{reader.lines:,})")
        f.sha256, f.lines = f.sha256 or reader.sha256, reader.lines
        stat = os.stat(f.path)
        sources.append({"path": os.path.abspath(f.path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": f.sha256, "lines": f.lines, "gzip": is_gzip(f.path), "day": f.day,
                        "segments": [{"split": s.split, "first_line": s.start + 1,
                                      "last_line": None if math.isinf(s.stop) else int(s.stop)}
                                     for s in f.segments]})
    progress.done()
    for split, c in counts.items():
        if c.read != c.written + c.rejected:  # a bug, never the data's fault
            raise RuntimeError(f"row accounting failed for {split}: {c.read} read != {c.written} + {c.rejected}")
        if c.written == 0:
            why = f" ({c.rejected:,} bad rows skipped)" if c.rejected else ""
            raise UserError(f"the {split} split has no valid rows{why}: nothing to train or evaluate on")
    if vocabulary:
        threshold = spec.min_frequency if spec.min_frequency is not None else 1
        mapping = CategoricalMapping.from_counts([c.result() for c in counters], threshold)
        mapping.prepare()
    spooled = {s: sink for s, sink in sinks.items() if isinstance(sink, Spool)}
    if spooled:
        label = "writing ids" if vocabulary else "shuffling the training split"
        progress.start(label, 0)
        finish = (lambda staged: finish_rows(staged, mapping)) if vocabulary else (lambda rows: rows)
        for split, spool in spooled.items():
            for rows in _in_order(pool, ((piece,) for piece in spool.drain()), finish, spec.workers + 1):
                writers[split].write(rows)
                progress.add_rows(len(rows))
        progress.done()
    for writer in writers.values():
        writer.close()
    for split, writer in writers.items():
        if writer.rows != counts[split].written:
            raise RuntimeError(f"{split}: wrote {writer.rows} rows, expected {counts[split].written}")
    return mapping, _manifest(spec, mapping, writers, counts, bad_rows, sources)


def _estimated_rows(f: InputFile, split: str) -> float:
    """Rows of ``split`` in a file, for sizing shuffle buckets (known for counted files)."""
    if f.lines is not None:
        return sum(min(s.stop, f.lines) - s.start for s in f.segments if s.split == split)
    if not any(s.split == split for s in f.segments):
        return 0
    ratio = 5 if is_gzip(f.path) else 1
    return f.size * ratio / 150  # Criteo lines are ~240 bytes; overestimating makes buckets smaller


def _manifest(spec: ConvertSpec, mapping: CategoricalMapping, writers: dict, counts: dict, bad_rows: BadRows,
              sources: list) -> dict:
    from tfdlrm import __version__

    table_sizes = list(mapping.table_sizes())
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "created_by": f"tfdlrm {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_format": spec.format,
        "split": {
            "method": "days" if spec.inputs else "given",
            "days": (KAGGLE_DAYS if spec.format == "kaggle" else TERABYTE_DAYS) if spec.inputs else None,
            "held_out": ("last day, halved: first half val, second half test" if spec.halve_held_out
                         else "last day: test") if spec.inputs else "the --test (and --val) files",
            "shuffled_train": spec.shuffle,
            "shuffle_seed": spec.seed if spec.shuffle else None,
        },
        "schema": {"label": LABEL_NAME, "dense": list(DENSE_NAMES), "categorical": list(CATEGORICAL_NAMES)},
        "record": {
            "layout": "row-blocks",
            "byte_order": "little",
            "bytes_per_row": ROW_BYTES,
            "rows_per_block": writers[next(iter(writers))].rows_per_block,
            "rows_per_shard": writers[next(iter(writers))].rows_per_shard,
            "columns": [
                {"name": "label", "words": [0, 1], "dtype": "float32"},
                {"name": "dense", "words": [1, 1 + NUM_DENSE], "dtype": "float32"},
                {"name": "sparse", "words": [1 + NUM_DENSE, ROW_WORDS], "dtype": "int32"},
            ],
            "compression": None,
        },
        "mapping": mapping.manifest_entry(),
        "table_sizes": table_sizes,
        "splits": {s: {**counts[s].to_dict(), "files": writers[s].files} for s in writers},
        "sources": sources,
        "bad_rows": {"policy": spec.on_bad_row, "examples": bad_rows.examples},
        "complete": True,
    }


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




# -- raw files used directly (train --data RAW.txt): converted once into a cache -------------------
CACHE_ENV = "TFDLRM_CACHE"


def default_cache_dir() -> Path:
    """``$TFDLRM_CACHE``, else ``$XDG_CACHE_HOME/tfdlrm``, else ``~/.cache/tfdlrm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfdlrm"


def cached_conversion(train: str, eval_data: Optional[str] = None, cache_dir: Optional[str] = None,
                      hash_buckets: Optional[int] = None, min_frequency: Optional[int] = None,
                      log: Callable[[str], None] = print) -> Path:
    """The converted dataset of raw file ``train`` (and held-out ``eval_data``), converting on first use.

    Without ``eval_data``, ``train`` is split by Kaggle's days.  The cache entry is
    ``CACHE/criteo/<name>-<key>``, where the key hashes the files' paths, sizes and
    modification times, the mapping and the converter's schema version: a changed
    file or setting converts again, anything else reuses the entry.
    """
    paths = [train] + ([eval_data] if eval_data else [])
    files = []
    for path in paths:
        check_input(path)
        stat = os.stat(path)
        files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    spec = ConvertSpec(out="", hash_buckets=hash_buckets, min_frequency=min_frequency,
                       inputs=[train] if not eval_data else (), train=[train] if eval_data else (),
                       test=[eval_data] if eval_data else ())
    threshold = None if hash_buckets is not None else (min_frequency or 1)
    key_data = {"schema": SCHEMA_VERSION, "files": files, "mapping": [spec.mapping_kind, hash_buckets, threshold],
                "split": bool(eval_data)}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / "criteo" / f"{Path(train).name}-{key}"
    if (out / MANIFEST).is_file():
        log(f"using the converted cache of {train}: {out}")
        return out
    spec.out = str(out)
    log(f"converting {train}" + (f" and {eval_data}" if eval_data else " (split into 7 days)")
        + f" into the cache {out} (once; later runs reuse it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory {out.parent}: {e.strerror or e} "
                        f"(choose another with --cache-dir or ${CACHE_ENV})") from None
    try:
        result = convert(spec)
    except UserError:
        if (out / MANIFEST).is_file():  # another process converted it meanwhile
            return out
        raise
    log(result.summary())
    return out
