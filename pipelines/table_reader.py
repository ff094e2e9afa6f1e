"""Your own CSV or TSV files with a header, read in chunks of rows and checked against a
feature spec (``convert --features``, pipelines/tabular.py).

Python's ``csv`` module splits the rows: comma-separated with quoting as Excel writes it,
tab-separated without quoting (a quote is a character); plain or gzip; a UTF-8 BOM is
dropped.  Each chunk holds the good rows' columns as strings, the label and raw dense values
parsed, and every bad row explained with its line: ``blank_line``, ``field_count``,
``label``, ``dense``, ``categorical``.
"""
from __future__ import annotations

import csv
import gzip
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from tfdlrm.errors import UserError, io_error_text
from tfdlrm.pipelines.spec import FeatureSpec
from tfdlrm.pipelines.tsv import is_gzip

CHUNK_ROWS = 1 << 15
LABELS = {"0": 0.0, "1": 1.0}
FIELD_LIMIT = 1 << 20  # bytes a field (csv's default is 128 KiB)


@dataclass
@dataclass
class Chunk:
    """Rows of one file: the good rows' columns (strings) and the bad rows, explained."""

    first_row: int  # data rows of the file before this chunk
    rows: int  # data rows (lines with content, blank ones included) in the chunk
    columns: dict  # name -> np.ndarray of str (good rows only)
    label: np.ndarray
    dense: np.ndarray  # float32 [n, num_dense] raw (NaN = missing)
    good: np.ndarray  # int64 chunk-relative index of each good row
    bad: list  # (line, chunk-relative row, kind, reason)


def _open(path: str):
    """The file as text; a UTF-8 byte order mark at its start (Excel writes one) is dropped."""
    try:
        if is_gzip(path):
            return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
        return open(path, "r", encoding="utf-8-sig", newline="")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def delimiter_of(path: str, spec: FeatureSpec, header_line: str) -> str:
    if spec.delimiter is not None:
        return spec.delimiter
    name = path.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return ","
    if name.endswith((".tsv", ".txt", ".tab")):
        return "\t"
    return "\t" if "\t" in header_line else ","


class TableReader:
    """One CSV/TSV file with a header, read in chunks of rows, checked against the spec."""

    def __init__(self, path: str, spec: FeatureSpec):
        self.path, self.spec = path, spec
        with _open(path) as f:
            try:
                first = f.readline()
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {path}: {_why(e)}") from None
        self.delimiter = delimiter_of(path, spec, first)
        try:
            header = next(csv.reader([first], delimiter=self.delimiter), [])
        except csv.Error as e:
            raise UserError(f"{path} line 1 (the header): {e}") from None
        header = [h.strip() for h in header]
        if not any(header):
            raise UserError(f"{path} is empty or has no header line (the first line must name the columns)")
        missing = [c for c in spec.columns if c not in header]
        if missing:
            raise UserError(f"{path} has no column(s) {', '.join(missing)} that the feature spec names "
                            f"(its header: {', '.join(header[:20])}{' ...' if len(header) > 20 else ''}; "
                            f"delimiter {self.delimiter!r})")
        duplicates = [c for c in spec.columns if header.count(c) > 1]  # other columns may repeat: unused
        if duplicates:
            raise UserError(f"{path}: the header names {', '.join(duplicates)} more than once")
        self.header = header
        self.index = {c: header.index(c) for c in spec.columns}
        self.ignored = [h for h in header if h not in self.index]
        self.rows = 0

    def chunks(self, on_bytes: Callable[[int], None] = lambda n: None) -> Iterator[Chunk]:
        csv.field_size_limit(FIELD_LIMIT)
        width = len(self.header)
        dense_names = [c.name for c in self.spec.dense]
        categorical = [c.name for c in self.spec.categorical]
        with _open(self.path) as f:
            raw = f.buffer if hasattr(f, "buffer") else None
            reader = csv.reader(f, delimiter=self.delimiter, strict=True,
                                quoting=csv.QUOTE_NONE if self.delimiter == "\t" else csv.QUOTE_MINIMAL)
            try:
                next(reader)  # the header
                done = False
                while not done:
                    records, lines = [], []
                    try:
                        for record in reader:
                            records.append(record)
                            lines.append(reader.line_num)
                            if len(records) >= CHUNK_ROWS:
                                break
                        else:
                            done = True
                    except csv.Error as e:
                        # A broken quote: the rest of the file cannot be split into rows.
                        raise UserError(f"{self.path} line {reader.line_num:,}: {e} (a quote is not closed; "
                                        f"the rest of the file cannot be read as rows)") from None
                    if not records:
                        break
                    if raw is not None:
                        try:
                            on_bytes(raw.tell())
                        except (OSError, ValueError):
                            pass
                    yield self._chunk(records, lines, width, dense_names, categorical)
            except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
                raise UserError(f"cannot read {self.path}: {_why(e)}") from None

    def _chunk(self, records, lines, width, dense_names, categorical) -> Chunk:
        first = self.rows
        self.rows += len(records)
        bad, good_records, good = [], [], []
        for i, record in enumerate(records):
            if not record:
                bad.append((lines[i], i, "blank_line", "blank line"))
            elif len(record) != width:
                bad.append((lines[i], i, "field_count", f"{len(record)} fields, the header has {width}"))
            else:
                good_records.append(record)
                good.append(i)
        columns = {}
        if good_records:
            for name, j in self.index.items():
                columns[name] = np.array([r[j] for r in good_records], dtype=object)
        else:
            columns = {name: np.zeros(0, dtype=object) for name in self.index}
        good = np.asarray(good, np.int64)
        ok = np.ones(len(good), bool)
        reasons: dict = {}
        label_text = columns[self.spec.label]
        label = np.array([LABELS.get(v, np.nan) for v in label_text], np.float32)
        for k in np.flatnonzero(np.isnan(label)):
            ok[k] = False
            reasons.setdefault(k, ("label", f"label {self.spec.label} is {label_text[k]!r}, not 0 or 1"))
        dense = np.zeros((len(good), len(dense_names)), np.float32)
        import pandas as pd

        for d, name in enumerate(dense_names):
            text = columns[name]
            values = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(np.float64)
            broken = np.isnan(values) & np.array([v.strip().lower() not in ("", "nan") for v in text], bool)
            for k in np.flatnonzero(broken):
                ok[k] = False
                reasons.setdefault(k, ("dense", f"{name} is {text[k]!r}, not a number"))
            with np.errstate(over="ignore", invalid="ignore"):
                dense[:, d] = values.astype(np.float32)
        for name in categorical:
            text = columns[name]
            broken = np.array([("\n" in v) or ("\r" in v) for v in text], bool)
            for k in np.flatnonzero(broken):
                ok[k] = False
                reasons.setdefault(k, ("categorical", f"{name} holds a line break"))
        for k in np.flatnonzero(~ok):
            kind, reason = reasons[k]
            bad.append((lines[good[k]], int(good[k]), kind, reason))
        bad.sort()
        keep = np.flatnonzero(ok)
        return Chunk(first, len(records), {n: c[keep] for n, c in columns.items()}, label[keep], dense[keep],
                     good[keep], bad)


def _why(e: BaseException) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, EOFError):
        return "the gzip stream ends early (a truncated file)"
    return io_error_text(e) if isinstance(e, OSError) else str(e)
