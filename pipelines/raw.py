"""``tfdlrm generate``: raw Criteo-format rows from the synthetic teacher, streamed.

Each row is what Criteo's logs hold (label TAB 13 integer counts TAB 26 8-hex values,
empty = missing), drawn from :class:`~tfdlrm.pipelines.generators.SyntheticData`'s world:
the same skewed ids, log-normal counts and teacher labels as ``--data synthetic``, with some
values missing.  Rows come in blocks of :data:`BLOCK_ROWS`, each from a stateless seed
``(seed, block)``, so a file is the same whatever the machine, and formatted to text with
array operations (no per-row Python).  A JSON sidecar ``FILE.json`` records the seed and
the teacher's exact AUC on the held-out part (Kaggle's day 7; Terabyte's day 23), the
ceiling a model trained on the file can approach.  See docs/data.md.
"""
from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import NUM_CATEGORICAL, NUM_DENSE
from tfdlrm.pipelines.splits import KAGGLE_DAYS, TERABYTE_DAYS, day_sizes

BLOCK_ROWS = 1 << 16
INT_DIGITS = 10  # counts are clipped below 10**10
_HEX_WIDTH = 1 + 8  # TAB + 8 hex digits
FORMATS = ("kaggle", "terabyte")


def hex8(values: np.ndarray) -> np.ndarray:
    """uint32 values -> their 8 lower-case hex digits, uint8 [..., 8] (SWAR on 64-bit words)."""
    x = values.astype(np.uint64)
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)  # byte k: nibble k
    letters = ((x + np.uint64(0x0606060606060606)) >> np.uint64(4)) & np.uint64(0x0101010101010101)
    x = x + np.uint64(0x3030303030303030) + letters * np.uint64(0x27)
    return x.byteswap().view(np.uint8).reshape(*values.shape, 8)  # the top nibble first


def format_rows(label: np.ndarray, counts: np.ndarray, values: np.ndarray, dense_missing: np.ndarray,
                categorical_missing: np.ndarray) -> bytes:
    """Criteo text lines for ``n`` rows: ``label`` [n] 0/1, ``counts`` int64 [n, 13] (>= 0),
    ``values`` uint32 [n, 26], and the two missing masks (an empty field)."""
    n = len(label)
    counts = np.minimum(counts, 10**INT_DIGITS - 1)
    digits = max(1, len(str(int(counts.max())))) if n else 1  # this block's widest count
    int_width = 1 + digits
    width = 1 + NUM_DENSE * int_width + NUM_CATEGORICAL * _HEX_WIDTH + 1
    text = np.empty((n, width), np.uint8)
    keep = np.ones((n, width), bool)
    text[:, 0] = 48 + label.astype(np.uint8)
    ints = text[:, 1:1 + NUM_DENSE * int_width].reshape(n, NUM_DENSE, int_width)
    ints_keep = keep[:, 1:1 + NUM_DENSE * int_width].reshape(n, NUM_DENSE, int_width)
    ints[:, :, 0] = 9
    rest = counts.astype(np.int64)
    for k in range(digits, 0, -1):  # the last digit first
        rest, digit = np.divmod(rest, 10)
        ints[:, :, k] = 48 + digit
    powers = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    ints_keep[:, :, 1:] = (counts[:, :, None] >= powers) | (powers == 1)  # no leading zeros; "0" stays
    ints_keep[:, :, 1:] &= ~dense_missing[:, :, None]
    start = 1 + NUM_DENSE * int_width
    hexes = text[:, start:start + NUM_CATEGORICAL * _HEX_WIDTH].reshape(n, NUM_CATEGORICAL, _HEX_WIDTH)
    hexes[:, :, 0] = 9
    hexes[:, :, 1:] = hex8(values)
    keep[:, start:start + NUM_CATEGORICAL * _HEX_WIDTH].reshape(n, NUM_CATEGORICAL, _HEX_WIDTH)[:, :, 1:] = \
        ~categorical_missing[:, :, None]
    text[:, -1] = 10
    return text[keep].tobytes()


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
        self.multipliers = (rng.integers(0, 2**31, NUM_CATEGORICAL, dtype=np.uint64) * 2 + 1).astype(np.uint64)
        self.salts = rng.integers(0, 2**32, NUM_CATEGORICAL, dtype=np.uint64)

    def block(self, index: int, rows: int):
        """``(text bytes, label [rows], teacher probability [rows])`` of block ``index``."""
        import tensorflow as tf

        seed = tf.constant([self.seed, 1_000_003 + index], tf.int64)
        counts, ids, dense_missing, categorical_missing, label, p = self.world.raw_sample(
            rows, seed, self.dense_missing, self.categorical_missing)
        values = ((ids.astype(np.uint64) * self.multipliers + self.salts) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        text = format_rows(label.astype(np.uint8), counts.astype(np.int64), values, dense_missing, categorical_missing)
        return text, label, p


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
