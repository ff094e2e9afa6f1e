"""``tfdlrm convert``: raw Criteo TSV(.gz) -> shuffled TFRecord shards + manifest.

Two passes with a vocabulary (count, then map), one with hashing; chunks are parsed on a
thread pool; bad rows are counted by kind (``--on-bad-row error|skip``); the output appears
atomically.  See docs/data.md.
"""
from __future__ import annotations

import collections
import datetime
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tfdlrm.errors import UserError, io_error_text
from tfdlrm.pipelines.bad_rows import BadRows, SplitCounts
from tfdlrm.pipelines.features import (
    CATEGORICAL_NAMES,
    DENSE_NAMES,
    LABEL_NAME,
    NUM_CATEGORICAL,
    NUM_DENSE,
    dense_transform_np,
)
from tfdlrm.pipelines.manifest import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_SHARD_ROWS,
    FORMAT_NAME,
    MANIFEST,
    ROW_BYTES,
    ROW_WORDS,
    SCHEMA_VERSION,
    SPLITS,
    SplitWriter,
    manifest_json,
    pack_rows,
)
from tfdlrm.pipelines.progress import Progress
from tfdlrm.pipelines.shuffle import SHUFFLE_BUCKET_ROWS, Spool
from tfdlrm.pipelines.splits import (
    KAGGLE_DAYS,
    TERABYTE_DAYS,
    InputFile,
    Segment,
    _estimated_rows,
    _locate,
    plan_inputs,
)
from tfdlrm.pipelines.tsv import (
    ChunkReader,
    explain_line,
    is_gzip,
    parse_chunk,
)
from tfdlrm.pipelines.vocabulary import (
    CategoricalMapping,
    ValueCounter,
    check_hash_buckets,
    check_min_frequency,
)
from tfdlrm.presets import BAD_ROW_POLICIES, FORMATS
from tfdlrm.publish import make_partial, recover_beside, replace_dir


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
    val_fraction: Optional[float] = None  # with --train: the last fraction of the training lines -> val
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
        if self.val_fraction is not None:
            if not 0 < self.val_fraction < 1:
                raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
            if not self.train:
                raise UserError("--val-fraction holds out part of --train; for day splits use --halve-held-out")
            if self.val:
                raise UserError("give either --val FILES or --val-fraction, not both")
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


STAGED_WORDS = ROW_WORDS + 1  # vocabulary mode between the passes: raw values + a missing bitmask
_BITS = (1 << np.arange(NUM_CATEGORICAL)).astype(np.int64)


@dataclass
class ChunkResult:
    lines: int
    read: dict  # split -> lines of the chunk in the split
    rows: dict  # split -> int32 [n, 40] final rows, or [n, 41] staged rows (vocabulary mode)
    counted: Optional[list]  # vocabulary mode: per feature (values, counts) of the training rows
    bad: list  # (line 1-based, split, kind, reason), in line order


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
    _check_out(out, spec.overwrite, log)
    progress = Progress(spec.progress)
    files = plan_inputs(spec, progress)
    try:  # .NAME.partial-PID-HEX, locked while written: the next run deletes it if this process dies
        partial, lock = make_partial(out.parent, out.name, lock=True, parents=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    try:
        with ThreadPoolExecutor(max_workers=spec.workers, thread_name_prefix="convert") as pool:
            mapping, manifest = _convert_files(spec, files, partial, pool, progress)
        mapping.save_vocabulary(partial)
        (partial / MANIFEST).write_text(manifest_json(manifest))
        lock.release()  # removes .lock, no part of the dataset (the pid in the name still says we live)
        _replace(partial, out, spec.overwrite)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        lock.release()
        if isinstance(e, OSError) or type(e).__module__.startswith("tensorflow"):  # a disk full, a file gone
            raise UserError(f"cannot convert into {out}: {io_error_text(e)} (nothing was written to {out})") from None
        raise
    seconds = time.perf_counter() - t0
    rows_read = sum(s["rows_read"] for s in manifest["splits"].values())
    return ConversionResult(str(out), manifest, seconds, rows_read)


def _check_out(out: Path, overwrite: bool, log: Callable[[str], None] = lambda line: None) -> None:
    recover_beside(out, lambda d: (d / MANIFEST).is_file(), aside="old", log=log)  # killed conversions' leftovers
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory {out} already exists and is not empty (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def _replace(partial: Path, out: Path, overwrite: bool) -> None:
    """The finished dataset to ``out``: a rename, or one exchange with the old one (publish.replace_dir)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {out} appeared during the conversion; not replacing it")
        return replace_dir(partial, out, partial.with_name(partial.name.replace(".partial-", ".old-", 1)))
    os.rename(partial, out)  # over an empty directory too


def _in_order(pool: ThreadPoolExecutor, jobs, work: Callable, depth: int):
    """``work(*job)`` for each job on the pool, results in job order, at most ``depth`` in flight."""
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.submit(work, *job))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
    counters = ([ValueCounter(spill_dir=directory / f".counts-{f:02d}") for f in range(NUM_CATEGORICAL)]
                if vocabulary else None)  # memory bounded: counts spill to disk past ValueCounter.MAX_ENTRIES
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
        mapping = CategoricalMapping.from_counts([c.result(threshold) for c in counters], threshold)
        for counter in counters:
            if counter.spill_dir.exists():
                shutil.rmtree(counter.spill_dir)
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
        "vocabulary_files": mapping.vocabulary_records(),  # what save_vocabulary writes: path, bytes, sha256
        "table_sizes": table_sizes,
        "splits": {s: {**counts[s].to_dict(), "files": writers[s].files} for s in writers},
        "sources": sources,
        "bad_rows": {"policy": spec.on_bad_row, "examples": bad_rows.examples},
        "complete": True,
    }
