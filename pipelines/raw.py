"""``tfdlrm generate``: raw Criteo-format rows from the synthetic teacher, streamed.

Each row is what Criteo's logs hold (label TAB 13 integer counts TAB 26 8-hex values,
empty = missing), drawn from :class:`~tfdlrm.pipelines.generators.SyntheticData`'s world:
the same skewed ids, log-normal counts and teacher labels as ``--data synthetic``, with some
values missing.  Rows come in blocks of :data:`BLOCK_ROWS`, each from a stateless seed
``(seed, block)``, so a file is the same whatever the thread count (numpy's exp and power
may differ in the last bit between CPU types), and formatted to text with
array operations (no per-row Python).  A JSON sidecar ``FILE.json`` records the seed and
the teacher's exact AUC on the held-out part (Kaggle's day 7; Terabyte's day 23), the
ceiling a model trained on the file can approach.  See docs/data.md.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import NUM_CATEGORICAL, NUM_DENSE
from tfdlrm.pipelines.splits import KAGGLE_DAYS, TERABYTE_DAYS, day_sizes

BLOCK_ROWS = 1 << 16
CHUNK_ROWS = 1 << 13  # a block is made a chunk at a time (its arrays stay in the cache)
INT_DIGITS = 10  # counts are clipped below 10**10
_HEX_WIDTH = 1 + 8  # TAB + 8 hex digits
FORMATS = ("kaggle", "terabyte")


def _tables():
    """4-byte groups as the text holds them, one uint32 each, a NUL for a byte to drop: the
    digits of 0..9999 as the last group of a number ("0" for 0), a leading group (nothing for
    0) and a group after a leading one (zero-padded), and the 4 hex digits of 0..65535."""
    def groups(digits: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(digits, np.uint8).view(np.uint32).ravel()

    d = np.arange(10_000)
    padded = 48 + np.stack([d // 1000, d // 100 % 10, d // 10 % 10, d % 10], 1)
    width = 1 + (d >= 10) + (d >= 100) + (d >= 1000)
    last = np.where(np.arange(4) >= 4 - width[:, None], padded, 0)
    lead = last.copy()
    lead[0] = 0
    h = np.arange(1 << 16)
    hexes = np.frombuffer(b"0123456789abcdef", np.uint8)[np.stack([h >> 12, h >> 8 & 15, h >> 4 & 15, h & 15], 1)]
    return groups(np.concatenate([last, lead, padded])), groups(hexes)


_DECIMAL, _HEX = _tables()
_LAST, _LEAD, _PADDED = 0, 10_000, 20_000  # the three parts of _DECIMAL


def hex8(values: np.ndarray) -> np.ndarray:
    """uint32 values -> their 8 lower-case hex digits, uint8 [..., 8]."""
    values = np.asarray(values, np.uint32)
    out = np.empty((*values.shape, 2), np.uint32)
    out[..., 0], out[..., 1] = _HEX[values >> 16], _HEX[values & 0xFFFF]
    return out.view(np.uint8).reshape(*values.shape, 8)


def format_rows(label: np.ndarray, counts: np.ndarray, values: np.ndarray, dense_missing: np.ndarray,
                categorical_missing: np.ndarray) -> bytes:
    """Criteo text lines for ``n`` rows: ``label`` [n] 0/1, ``counts`` int [n, 13] (>= 0),
    ``values`` uint32 [n, 26], and the two missing masks (an empty field)."""
    return _text(label, counts, values, dense_missing, categorical_missing).tobytes()


def _text(label, counts, values, dense_missing, categorical_missing) -> np.ndarray:
    """:func:`format_rows` as a uint8 array.

    Every field gets a fixed width (TAB + 4 digits a base-10,000 group of a count, TAB + 8 hex
    digits of a value), written as 4-byte words from tables, with NUL for a byte to drop (a
    leading zero, a missing value); dropping the NULs compacts the text."""
    n = len(label)
    top = int(counts.max()) if n else 0
    if top >= 10**INT_DIGITS:
        counts, top = np.minimum(counts, 10**INT_DIGITS - 1), 10**INT_DIGITS - 1
    groups = 1 if top < 10**4 else 2 if top < 10**8 else 3  # this block's widest count
    int_width = 1 + 4 * groups
    hex_start = 1 + NUM_DENSE * int_width
    width = hex_start + NUM_CATEGORICAL * _HEX_WIDTH + 1
    text = np.empty((n, width), np.uint8)

    def words(offset, step, fields, *size):  # [n, fields, *size] uint32 at offset + i * step of each row
        return np.ndarray((n, fields, *size), np.uint32, text, offset, (width, step, 4)[:2 + len(size)])

    text[:, 0] = 48 + label
    text[:, 1:hex_start:int_width] = 9
    text[:, hex_start:-1:_HEX_WIDTH] = 9
    text[:, -1] = 10
    counts = counts.astype(np.uint64 if groups == 3 else np.uint32)
    present = ~dense_missing
    for g in range(groups):  # the most significant group first
        place = 10 ** (4 * (groups - 1 - g))
        part = np.uint32(_LAST if g == groups - 1 else _LEAD)
        index = counts // place if place > 1 else counts
        if g:  # after a leading group that is not 0: zero-padded
            index = index % 10_000 + np.where(counts >= place * 10_000, np.uint32(_PADDED), part)
        elif part:
            index = index + part
        words(2 + 4 * g, int_width, NUM_DENSE)[...] = np.take(_DECIMAL, index) * present
    # values: the hex digits of their 16-bit halves, the high half first
    halves = np.take(_HEX, np.ascontiguousarray(values, np.uint32).view(np.uint16)).reshape(n, NUM_CATEGORICAL, 2)
    halves *= ~categorical_missing[:, :, None]
    words(hex_start + 1, _HEX_WIDTH, NUM_CATEGORICAL, 2)[...] = halves[:, :, ::-1] if sys.byteorder == "little" \
        else halves
    return text[text != 0]


@dataclass
class GenerateSpec:
    """What ``tfdlrm generate`` takes; :func:`generate` writes it."""

    out: str
    rows: int
    format: str = "kaggle"
    seed: int = 0
    table_rows: int = 100_000
    dense_missing: float = 0.05
    categorical_missing: float = 0.05
    gzip: bool = False  # terabyte: day_N.gz; kaggle: from the name (.gz)
    overwrite: bool = False
    progress: Optional[bool] = None

    def check(self) -> "GenerateSpec":
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        days = KAGGLE_DAYS if self.format == "kaggle" else TERABYTE_DAYS
        if self.rows < days:
            raise UserError(f"--rows must be at least {days} ({self.format} has {days} days), got {self.rows}")
        if not 1 <= self.table_rows <= 2**31 - 1:
            raise UserError(f"--table-rows must be from 1 to {2**31 - 1:,}, got {self.table_rows}")
        for name in ("dense_missing", "categorical_missing"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        return self


class RawRows:
    """Blocks of raw rows (and the teacher's click probability) from the synthetic world."""

    def __init__(self, table_rows: int, seed: int, dense_missing: float, categorical_missing: float):
        from tfdlrm.pipelines.generators import SyntheticData

        self.world = SyntheticData((table_rows,) * NUM_CATEGORICAL, NUM_DENSE, seed)
        self.seed = seed
        self.dense_missing, self.categorical_missing = dense_missing, categorical_missing
        rng = np.random.default_rng([seed, 7])
        # id -> a 32-bit value, one bijection per feature (odd multiplier mod 2**32, plus a salt)
        self.multipliers = (rng.integers(0, 2**31, NUM_CATEGORICAL, dtype=np.uint64) * 2 + 1).astype(np.uint32)
        self.salts = rng.integers(0, 2**32, NUM_CATEGORICAL, dtype=np.uint64).astype(np.uint32)

    def block(self, index: int, rows: int):
        """``(text bytes, label [rows], teacher probability [rows])`` of block ``index``."""
        import tensorflow as tf

        draws = self.world.raw_draws(rows, tf.constant([self.seed, 1_000_003 + index], tf.int64))
        texts, labels, ps = [], [], []
        for start in range(0, rows, CHUNK_ROWS):
            chunk = tuple(d[start:start + CHUNK_ROWS] for d in draws)
            counts, ids, dense_missing, categorical_missing, label, p = self.world.raw_rows(
                chunk, self.dense_missing, self.categorical_missing)
            values = ids.astype(np.uint32) * self.multipliers + self.salts  # mod 2**32
            texts.append(_text(label.astype(np.uint8), counts, values, dense_missing, categorical_missing))
            labels.append(label)
            ps.append(p)
        return b"".join(texts), np.concatenate(labels), np.concatenate(ps)


def _days(spec: GenerateSpec) -> list[int]:
    """Rows of each day, as ``convert`` splits them (pipelines/splits.py)."""
    return day_sizes(spec.rows, KAGGLE_DAYS if spec.format == "kaggle" else TERABYTE_DAYS)


def _files(spec: GenerateSpec) -> list[tuple[Path, int]]:
    """``(path, rows)`` of each file to write: Kaggle one file, Terabyte day_0 .. day_23."""
    if spec.format == "kaggle":
        return [(Path(spec.out), spec.rows)]
    suffix = ".gz" if spec.gzip else ""
    return [(Path(spec.out) / f"day_{d}{suffix}", rows) for d, rows in enumerate(_days(spec))]


def _held_out_rows(spec: GenerateSpec) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the held-out part: Kaggle's day 7, Terabyte's day 23 (the last day)."""
    return spec.rows - _days(spec)[-1], spec.rows


def generate(spec: GenerateSpec, log: Callable[[str], None] = print) -> dict:
    """Write the rows (see the module docstring); returns the sidecar's content."""
    from tfdlrm.metrics import exact_auc
    from tfdlrm.pipelines.progress import Progress

    spec.check()
    files = _files(spec)
    try:
        (Path(spec.out) if spec.format == "terabyte" else Path(spec.out).parent).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory for {spec.out}: {e.strerror or e}") from None
    for path, _ in files:
        if path.exists() and not spec.overwrite:
            raise UserError(f"{path} exists (use --overwrite to replace it)")
    rows = RawRows(spec.table_rows, spec.seed, spec.dense_missing, spec.categorical_missing)
    held_start, held_stop = _held_out_rows(spec)
    held_labels, held_p = [], []
    progress = Progress(spec.progress)
    progress.start("generating", 0)
    t0, written, block = time.perf_counter(), 0, 0
    pending = b""  # rows of a block that belong to the next file
    pending_rows = 0
    blocks = _blocks_in_order(rows, spec.rows)
    for path, file_rows in files:
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(partial, "wb", **({"compresslevel": 1} if path.suffix == ".gz" else {})) as f:
                left = file_rows
                while left:
                    if not pending_rows:
                        n = min(BLOCK_ROWS, spec.rows - block * BLOCK_ROWS)
                        text, label, p = next(blocks)
                        first = block * BLOCK_ROWS
                        lo, hi = max(held_start - first, 0), min(held_stop - first, n)
                        if hi > lo:
                            held_labels.append(label[lo:hi])
                            held_p.append(p[lo:hi])
                        block += 1
                        pending, pending_rows = text, n
                    take = min(left, pending_rows)
                    if take == pending_rows:
                        f.write(pending)
                        pending, pending_rows = b"", 0
                    else:  # split the block's text after `take` lines
                        cut = _line_offset(pending, take)
                        f.write(pending[:cut])
                        pending, pending_rows = pending[cut:], pending_rows - take
                    left -= take
                    written += take
                    progress.add_rows(take)
            os.replace(partial, path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    progress.done()
    seconds = time.perf_counter() - t0
    labels, p = np.concatenate(held_labels), np.concatenate(held_p)
    info = {"format": spec.format, "rows": spec.rows, "seed": spec.seed, "table_rows": spec.table_rows,
            "dense_missing": spec.dense_missing, "categorical_missing": spec.categorical_missing,
            "files": [str(path) for path, _ in files],
            "held_out": {"first_row": held_start, "rows": held_stop - held_start,
                         "teacher_auc": exact_auc(labels, p), "click_rate": float(labels.mean())},
            "seconds": round(seconds, 2), "rows_per_second": round(written / max(seconds, 1e-9))}
    sidecar = Path(spec.out + ".json") if spec.format == "kaggle" else Path(spec.out) / "generated.json"
    sidecar.write_text(json.dumps(info, indent=1) + "\n")
    log(f"wrote {written:,} rows to {spec.out} in {seconds:.1f} s ({info['rows_per_second']:,} rows/s); "
        f"teacher AUC on the held-out {info['held_out']['rows']:,} rows: {info['held_out']['teacher_auc']:.4f} "
        f"({sidecar})")
    return info


def _blocks_in_order(rows: RawRows, total: int, workers: int = 2, depth: int = 3):
    """Every block's ``(text, label, p)`` in order, made on ``workers`` threads (TensorFlow's
    sampling and numpy's formatting release the GIL)."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    count = -(-total // BLOCK_ROWS)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate") as pool:
        pending = collections.deque()
        for index in range(count):
            pending.append(pool.submit(rows.block, index, min(BLOCK_ROWS, total - index * BLOCK_ROWS)))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _line_offset(text: bytes, lines: int) -> int:
    """The byte offset just after the ``lines``-th LF of ``text``."""
    ends = np.flatnonzero(np.frombuffer(text, np.uint8) == 10)
    return int(ends[lines - 1]) + 1
