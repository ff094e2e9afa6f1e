"""``tfdlrm convert --features SPEC``: your own CSV or TSV (with a header) -> a dataset.

The same dataset directory as Criteo's (``manifest.json``, TFRecord shards of int32 row
blocks, ``vocabulary/``), with the feature spec in the manifest: a row is the label, the
transformed dense values (float32 bits) and, per categorical column, one id or (multi-hot)
``width`` ids padded with -1.  Two passes: the first counts the training split's values
(and bag lengths), the second maps every row with :class:`TabularFeatures`, the transform
the serving export runs.  Files are read with Python's ``csv`` module: comma-separated
with quoting as Excel writes it, tab-separated without quoting (a quote is a character);
plain or gzip.  Bad rows follow ``--on-bad-row error|skip`` with counts by
kind, as Criteo's.  See docs/data.md, "Your own features".
"""
from __future__ import annotations

import collections
import datetime
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tfdlrm.errors import UserError, io_error_text
from tfdlrm.pipelines.bad_rows import BadRows, SplitCounts, bad_row_error
from tfdlrm.pipelines.manifest import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_SHARD_ROWS,
    FORMAT_NAME,
    MANIFEST,
    SCHEMA_VERSION,
    SplitWriter,
    bytes_digest,
    file_digest,
    manifest_json,
)
from tfdlrm.pipelines.progress import Progress
from tfdlrm.pipelines.shuffle import Spool
from tfdlrm.pipelines.spec import (
    RARE_ID,
    FeatureSpec,
    TabularFeatures,
    dense_np,
    vocabulary_path,
)
from tfdlrm.pipelines.table_reader import Chunk, TableReader
from tfdlrm.pipelines.tsv import is_gzip
from tfdlrm.presets import BAD_ROW_POLICIES


@dataclass
class TabularSpec:
    """What ``convert --features`` takes; :func:`convert_tabular` runs it."""

    out: str
    features: str  # the spec file
    train: Sequence[str]
    test: Sequence[str] = ()
    val: Sequence[str] = ()
    val_fraction: Optional[float] = None
    min_frequency: Optional[int] = None  # the spec's default for vocabulary columns
    on_bad_row: str = "error"
    shuffle: bool = False
    seed: int = 0
    rows_per_shard: int = DEFAULT_SHARD_ROWS
    rows_per_block: int = DEFAULT_BLOCK_ROWS
    overwrite: bool = False
    progress: Optional[bool] = None

    def check(self) -> "TabularSpec":
        if not self.train:
            raise UserError("--features needs --train FILE (a CSV or TSV with a header)")
        if self.val_fraction is not None:
            if not 0 < self.val_fraction < 1:
                raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
            if self.val:
                raise UserError("give either --val FILES or --val-fraction, not both")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise UserError(f"--on-bad-row must be one of {', '.join(BAD_ROW_POLICIES)}, got {self.on_bad_row!r}")
        for name in ("rows_per_shard", "rows_per_block"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for path in (*self.train, *self.val, *self.test):
            if not os.path.isfile(path):
                raise UserError(f"input file not found: {path}")
        if not self.out:
            raise UserError("--out is required: the dataset directory to write")
        return self


@dataclass
class Counts(SplitCounts):
    truncated_bags: dict = field(default_factory=dict)  # column -> rows whose bag was cut to the width

    def to_dict(self) -> dict:
        return {**super().to_dict(), "truncated_bags": dict(self.truncated_bags)}


def _split_of(spec: TabularSpec, role: str, row: np.ndarray, train_rows: Optional[int]) -> np.ndarray:
    """Per data row of a chunk, its split (training files: the last ``val_fraction`` -> val)."""
    if role != "train" or train_rows is None:
        return np.full(len(row), role, dtype=object)
    return np.where(row < train_rows, "train", "val").astype(object)


def convert_tabular(spec: TabularSpec, log: Callable[[str], None] = print) -> "TabularResult":
    """Convert CSV/TSV files with a header to a dataset directory (see the module docstring)."""
    spec.check()
    features = FeatureSpec.load(spec.features)
    if spec.min_frequency is not None:
        from tfdlrm.pipelines.vocabulary import check_min_frequency

        check_min_frequency(spec.min_frequency)
        features = FeatureSpec.from_dict({**features.to_dict(), "min_frequency": spec.min_frequency})
    t0 = time.perf_counter()
    out = Path(spec.out)
    from tfdlrm.pipelines.convert import _check_out, _replace

    _check_out(out, spec.overwrite)
    roles = [(p, "train") for p in spec.train] + [(p, "val") for p in spec.val] + [(p, "test") for p in spec.test]
    readers = {p: TableReader(p, features) for p, _ in roles}  # every header checked before any work
    progress = Progress(spec.progress)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    try:
        manifest = _convert(spec, features, roles, readers, partial, progress)
        (partial / MANIFEST).write_text(manifest_json(manifest))
        _replace(partial, out, spec.overwrite)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__module__.startswith("tensorflow"):
            raise UserError(f"cannot convert into {out}: {io_error_text(e)} (nothing was written to {out})") from None
        raise
    seconds = time.perf_counter() - t0
    return TabularResult(str(out), manifest, seconds)


def _count_rows(paths: Sequence[str], features: FeatureSpec) -> int:
    total = 0
    for path in paths:
        total += sum(chunk.rows for chunk in TableReader(path, features).chunks())
    return total


def _convert(spec: TabularSpec, features: FeatureSpec, roles, readers, directory: Path, progress: Progress) -> dict:
    # Pass 0 (with --val-fraction): the training rows, to place the val boundary.
    train_rows = None
    if spec.val_fraction is not None:
        total = _count_rows(spec.train, features)
        train_rows = total - int(round(total * spec.val_fraction))
        if train_rows <= 0 or train_rows >= total:
            raise UserError(f"--val-fraction {spec.val_fraction} of {total:,} rows leaves no training or no "
                            f"validation rows")
    # Pass 1: count the training split's values and bag lengths.
    counters = [collections.Counter() for _ in features.categorical]
    longest = [0] * len(features.categorical)
    progress.start("counting values", sum(os.path.getsize(p) for p in spec.train))
    offset = 0
    for path in spec.train:
        reader = TableReader(path, features)
        for chunk in reader.chunks(progress.at_bytes):
            _stop_at_bad(spec, path, chunk)
            rows = offset + chunk.first_row + chunk.good
            keep = rows < train_rows if train_rows is not None else np.ones(len(rows), bool)
            for f, column in enumerate(features.categorical):
                values = chunk.columns[column.name][keep]
                if column.multi_hot:
                    bags = [[t for t in v.split(column.separator) if t] for v in values]
                    longest[f] = max(longest[f], max((len(b) for b in bags), default=0))
                    if column.kind == "vocabulary":
                        counters[f].update(t for b in bags for t in b)
                elif column.kind == "vocabulary":
                    counters[f].update(v for v in values if v)
            progress.add_rows(chunk.rows)
        offset += reader.rows
        progress.next_file()
    progress.done()
    entry, vocabulary_files = _write_vocabulary(features, counters, longest, directory)
    transform = TabularFeatures(entry, str(directory))

    # Pass 2: map every row, write shards.
    splits = [s for s in ("train", "val", "test") if any(r == s for _, r in roles)
              or (s == "val" and train_rows is not None)]
    writers = {s: SplitWriter(directory, s, spec.rows_per_shard, spec.rows_per_block) for s in splits}
    words = 1 + len(features.dense) + sum(c["width"] for c in entry["columns"])
    sinks = dict(writers)
    if spec.shuffle:
        sinks["train"] = Spool(directory, "train", words, True, 1 + _estimated(spec) // (1 << 20), spec.seed)
    counts = {s: Counts() for s in splits}
    bad_rows = BadRows(spec.on_bad_row)
    sources = []
    progress.start("writing rows", sum(os.path.getsize(p) for p, _ in roles))
    offset = 0
    for path, role in roles:
        reader = TableReader(path, features)
        for chunk in reader.chunks(progress.at_bytes):
            row_split = _split_of(spec, role, offset + chunk.first_row + np.arange(chunk.rows), train_rows)
            for split in np.unique(row_split):
                counts[split].read += int(np.sum(row_split == split))
            bad_rows.handle(path, [(line, row_split[i], kind, reason) for line, i, kind, reason in chunk.bad], counts)
            good_split = row_split[chunk.good] if len(chunk.good) else np.zeros(0, object)
            rows, truncated = _rows(chunk, features, entry, transform)
            for split in np.unique(good_split):
                mask = good_split == split
                sinks[split].write(rows[mask])
                counts[split].written += int(mask.sum())
                for name, cut in truncated.items():
                    n = int(np.sum(cut & mask))
                    if n:
                        counts[split].truncated_bags[name] = counts[split].truncated_bags.get(name, 0) + n
            progress.add_rows(chunk.rows)
        offset = offset + reader.rows if role == "train" else offset
        progress.next_file()
        stat = os.stat(path)
        sources.append({"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": file_digest(path)["sha256"], "rows": reader.rows, "gzip": is_gzip(path), "role": role,
                        "delimiter": reader.delimiter, "ignored_columns": reader.ignored})
    progress.done()
    if spec.shuffle:
        for rows in sinks["train"].drain():
            writers["train"].write(rows)
    for writer in writers.values():
        writer.close()
    for split, c in counts.items():
        if c.read != c.written + c.rejected or writers[split].rows != c.written:  # a bug, never the data's fault
            raise RuntimeError(f"row accounting failed for {split}: {c.read} read, {c.written} written "
                               f"({writers[split].rows} in shards), {c.rejected} rejected")
        if c.written == 0:
            why = f" ({c.rejected:,} bad rows skipped)" if c.rejected else ""
            raise UserError(f"the {split} split has no valid rows{why}: nothing to train or evaluate on")
    return {**_manifest(spec, features, entry, writers, counts, bad_rows.examples, sources, words),
            "vocabulary_files": vocabulary_files}


def _stop_at_bad(spec: TabularSpec, path: str, chunk: Chunk) -> None:
    if spec.on_bad_row == "error" and chunk.bad:
        line, _, _, reason = chunk.bad[0]
        raise bad_row_error(path, line, reason)


def _estimated(spec: TabularSpec) -> int:
    return sum(os.path.getsize(p) for p in spec.train) // 64


def _write_vocabulary(features: FeatureSpec, counters, longest, directory: Path) -> tuple[dict, list]:
    """The manifest's ``features`` entry and ``vocabulary_files`` (path, bytes, sha256 of each
    file); vocabulary files written (most frequent first)."""
    columns, files = [], []
    for column, counter, bag in zip(features.categorical, counters, longest):
        info: dict = {"name": column.name, "kind": column.kind, "multi_hot": column.multi_hot}
        if column.kind == "hash":
            info.update(hash_buckets=column.hash_buckets, table_size=column.hash_buckets + 1)
        else:
            threshold = column.min_frequency or features.min_frequency
            kept = sorted((v for v, n in counter.items() if n >= threshold), key=lambda v: (-counter[v], v))
            path = vocabulary_path(directory, column.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = "".join(v + "\n" for v in kept).encode("utf-8")
            path.write_bytes(data)
            files.append({"path": path.relative_to(directory).as_posix(), **bytes_digest(data)})
            info.update(min_frequency=threshold, vocabulary_size=len(kept), distinct_values=len(counter),
                        table_size=len(kept) + 2)
        info["width"] = (column.max_ids or max(bag, 1)) if column.multi_hot else 1
        columns.append(info)
    return {"spec": features.to_dict(), "columns": columns,
            "ids": f"0 missing, {RARE_ID} rare or unseen (vocabulary), 2.. vocabulary by decreasing count; "
                   f"hashed: 1 + fingerprint64 mod buckets; bags padded with -1"}, files


def _rows(chunk: Chunk, features: FeatureSpec, entry: dict, transform: TabularFeatures):
    """int32 [n, words] rows of the chunk's good rows, and per multi-hot column which bags were cut."""
    import tensorflow as tf

    n = len(chunk.label)
    parts = [chunk.label[:, None].view(np.int32)]
    dense = np.stack([dense_np(chunk.dense[:, d], c.transform) for d, c in enumerate(features.dense)], axis=1) \
        if n else np.zeros((0, len(features.dense)), np.float32)
    parts.append(dense.astype(np.float32).view(np.int32))
    truncated = {}
    for f, (column, info) in enumerate(zip(features.categorical, entry["columns"])):
        values = tf.constant(chunk.columns[column.name].astype(str) if n else np.zeros(0, str), tf.string)
        if column.multi_hot:
            lengths = transform.tokens(f, values).row_lengths().numpy()
            truncated[column.name] = lengths > info["width"]
            ids = transform.bag(f, values).to_tensor(default_value=-1, shape=[n, info["width"]]).numpy()
        else:
            ids = transform.ids(f, values).numpy()[:, None]
        parts.append(ids.astype(np.int32))
    return np.concatenate(parts, axis=1), truncated


def _manifest(spec: TabularSpec, features: FeatureSpec, entry: dict, writers: dict, counts: dict, examples: list,
              sources: list, words: int) -> dict:
    from tfdlrm import __version__

    first = writers[next(iter(writers))]
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "created_by": f"tfdlrm {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_format": "table",
        "split": {
            "method": "given",
            "held_out": "the --test (and --val) files" + (
                f"; val: the last {spec.val_fraction} of the training rows" if spec.val_fraction else ""),
            "shuffled_train": spec.shuffle,
            "shuffle_seed": spec.seed if spec.shuffle else None,
        },
        "schema": {"label": features.label, "dense": [c.name for c in features.dense],
                   "categorical": [c.name for c in features.categorical]},
        "record": {
            "layout": "row-blocks",
            "byte_order": "little",
            "bytes_per_row": 4 * words,
            "rows_per_block": first.rows_per_block,
            "rows_per_shard": first.rows_per_shard,
            "columns": [{"name": "label", "words": [0, 1], "dtype": "float32"},
                        {"name": "dense", "words": [1, 1 + len(features.dense)], "dtype": "float32"},
                        {"name": "sparse", "words": [1 + len(features.dense), words], "dtype": "int32",
                         "widths": [c["width"] for c in entry["columns"]]}],
            "compression": None,
        },
        "mapping": {"categorical": "spec"},
        "features": entry,
        "table_sizes": [c["table_size"] for c in entry["columns"]],
        "splits": {s: {**counts[s].to_dict(), "files": writers[s].files} for s in writers},
        "sources": sources,
        "bad_rows": {"policy": spec.on_bad_row, "examples": examples},
        "complete": True,
    }


@dataclass
class TabularResult:
    out: str
    manifest: dict
    seconds: float

    def summary(self) -> str:
        splits = self.manifest["splits"]
        lines = [f"{'split':6} {'rows read':>12} {'written':>12} {'rejected':>10}  shards"]
        for name, s in splits.items():
            lines.append(f"{name:6} {s['rows_read']:>12,} {s['rows_written']:>12,} {s['rows_rejected']:>10,}  "
                         f"{len(s['files'])}")
            kinds = ", ".join(f"{k} {n:,}" for k, n in s["rejected_by_kind"].items() if n)
            if kinds:
                lines.append(f"       rejected: {kinds}")
            for name_, n in s["truncated_bags"].items():
                lines.append(f"       {n:,} {name_} bags longer than the width were cut to it")
        for example in self.manifest["bad_rows"]["examples"][:5]:
            lines.append(f"skipped {example['file']} line {example['line']:,}: {example['reason']}")
        for c in self.manifest["features"]["columns"]:
            how = (f"hashed into {c['hash_buckets']:,} buckets" if c["kind"] == "hash" else
                   f"vocabulary {c['vocabulary_size']:,} of {c['distinct_values']:,} values "
                   f"(min frequency {c['min_frequency']})")
            bag = f", bags of up to {c['width']} ids" if c["multi_hot"] else ""
            lines.append(f"{c['name']}: {how}{bag}; table {c['table_size']:,} rows")
        ignored = sorted({col for src in self.manifest["sources"] for col in src["ignored_columns"]})
        if ignored:
            lines.append(f"columns not in the spec (not used): {', '.join(ignored)}")
        rows = sum(s["rows_read"] for s in splits.values())
        lines.append(f"wrote {self.out} in {self.seconds:.1f} s: {rows / max(self.seconds, 1e-9):,.0f} rows/s")
        return "\n".join(lines)
