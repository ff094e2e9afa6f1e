"""Reading Criteo's raw TSV fast: chunks of whole lines, parsed with vectorised numpy.

It splits a chunk of bytes into fields with a few array operations and parses the
fields with 64-bit SWAR arithmetic, and knows the line number of every rejected row
(why not pandas or TensorFlow's CSV ops, measured: docs/data.md).

Row grammar (anything else is a bad row)::

    line   = label TAB I1 TAB .. I13 TAB C1 TAB .. C26 (LF | CR LF | end of file)
    label  = "0" | "1"
    I      = "" | "-"? digit{1,18}
    C      = "" | hexdigit{8}            (either case)

CRLF line endings are accepted: a CR right before the LF is dropped.  A CR
anywhere else is an invalid character.  A UTF-8 byte order mark at the start of a
file is dropped.  A blank line is a bad row (it is a line,
counted as read and rejected).  A final line without LF is a row.

Bad rows are found by the vectorised checks and then explained one at a time by
:func:`explain_line` (plain Python), which gives the kind and the reason.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import (
    FIELD_NAMES,
    NUM_CATEGORICAL,
    NUM_DENSE,
    NUM_FIELDS,
)

CHUNK_BYTES = 8 << 20
MAX_LINE_BYTES = 1 << 20
MAX_DENSE_DIGITS = 18
NL = b"\n"
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, dropped at the start of a file
PAD = 8  # guard bytes before and after a chunk, for the 8-byte loads

BAD_KINDS = ("blank_line", "field_count", "label", "dense", "categorical")

_U = np.uint64
_ONES = _U(0x0101010101010101)
_HIGH = _U(0x8080808080808080)
_C30 = _U(0x3030303030303030)
_F0 = _U(0xF0F0F0F0F0F0F0F0)
_0F = _U(0x0F0F0F0F0F0F0F0F)
_C06 = _U(0x0606060606060606)
_C20 = _U(0x2020202020202020)
_M16 = _U(0x00FF00FF00FF00FF)
_M32 = _U(0x0000FFFF0000FFFF)
_M64 = _U(0xFFFFFFFF)
_ALL = _U(0xFFFFFFFFFFFFFFFF)
# _KEEP[k]: the high k bytes of a word (the last k characters before a field's end)
_KEEP = np.array([0] + [(0xFFFFFFFFFFFFFFFF << (8 * (8 - k))) & 0xFFFFFFFFFFFFFFFF for k in range(1, 9)], np.uint64)
_SEPARATORS = np.array([9] * (NUM_FIELDS - 1) + [10], np.uint8)


def _in_range(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per byte of ``x`` (all bytes < 0x80): 0x80 where ``lo <= byte <= hi``, else 0."""
    ge = x + _U((0x80 - lo) * 0x0101010101010101)
    le = ~(x + _U((0x7F - hi) * 0x0101010101010101))
    return ge & le & _HIGH


def _loads(buf: np.ndarray) -> np.ndarray:
    """``out[i]`` = the 8 bytes ``buf[i:i+8]`` as a little-endian uint64 (an unaligned view)."""
    return np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, offset=0, strides=(1,))


@dataclass
class ParsedChunk:
    """The rows of one chunk.  Good rows are parsed; bad rows are only located.

    ``lines``: lines in the chunk.  ``good``: int64 [n] chunk-relative line index of
    each good row.  ``label`` float32 [n]; ``dense`` float32 [n, 13] raw counts (NaN =
    missing); ``values`` uint32 [n, 26] and ``missing`` bool [n, 26] for the hex
    fields.  ``bad``: int64 [m] chunk-relative line indices of bad rows, and
    ``bad_text`` their bytes (without the line ending).
    """

    lines: int
    good: np.ndarray
    label: np.ndarray
    dense: np.ndarray
    values: np.ndarray
    missing: np.ndarray
    bad: np.ndarray
    bad_text: list

    def select(self, rows) -> "ParsedChunk":
        """The good rows ``rows`` (an index array or slice) only; bad rows unchanged."""
        return ParsedChunk(self.lines, self.good[rows], self.label[rows], self.dense[rows], self.values[rows],
                           self.missing[rows], self.bad, self.bad_text)


def parse_chunk(data) -> ParsedChunk:
    """Parse ``data`` (bytes, or a list of bytes to concatenate): whole lines, each ending in LF."""
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    size = sum(len(piece) for piece in pieces)
    buf = np.empty(size + 2 * PAD, np.uint8)
    buf[:PAD] = 0
    buf[PAD + size:] = 0
    at = PAD
    for piece in pieces:
        buf[at:at + len(piece)] = np.frombuffer(piece, np.uint8)
        at += len(piece)
    sep = np.flatnonzero(buf[PAD:PAD + size] < 11)  # TAB, LF, and control bytes (caught below)
    sep += PAD
    kinds = buf[sep]
    nl = np.flatnonzero(kinds == 10)  # position in `sep` of each line's LF
    lines = len(nl)
    if lines == 0:
        empty = np.zeros(0, np.int64)
        return ParsedChunk(0, empty, np.zeros(0, np.float32), np.zeros((0, NUM_DENSE), np.float32),
                           np.zeros((0, NUM_CATEGORICAL), np.uint32), np.zeros((0, NUM_CATEGORICAL), bool),
                           empty, [])
    line_end = sep[nl]
    line_start = np.empty(lines, np.int64)
    line_start[0] = PAD
    line_start[1:] = line_end[:-1] + 1

    if len(sep) == NUM_FIELDS * lines and (kinds.reshape(lines, NUM_FIELDS) == _SEPARATORS).all():
        shaped = np.ones(lines, bool)  # the common case: every line has 40 fields
        ends = sep.reshape(lines, NUM_FIELDS)
    else:
        per_line = np.diff(nl, prepend=-1)
        shaped = per_line == NUM_FIELDS
        other = np.flatnonzero((kinds != 9) & (kinds != 10))
        if len(other):  # a control byte is not a separator: its line is bad
            shaped[np.searchsorted(nl, other)] = False
        ends = sep[np.repeat(shaped, per_line)].reshape(-1, NUM_FIELDS)
    rows = np.flatnonzero(shaped)
    starts = np.empty_like(ends)
    starts[:, 0] = line_start[rows]
    starts[:, 1:] = ends[:, :-1] + 1
    # CRLF: drop a CR that ends the last field.
    last_end = ends[:, -1]
    crlf = (last_end > starts[:, -1]) & (buf[last_end - 1] == 13)
    ends[:, -1] -= crlf
    lengths = ends - starts
    loads = _loads(buf)

    # label: exactly "0" or "1"
    first = buf[starts[:, 0]]
    ok = (lengths[:, 0] == 1) & ((first == 48) | (first == 49))
    label = (first == 49).astype(np.float32)

    # dense: "" or "-"? digits; up to 8 digits by SWAR on the 8 bytes ending at the field's end
    d_start = np.ascontiguousarray(starts[:, 1:1 + NUM_DENSE])
    d_end = np.ascontiguousarray(ends[:, 1:1 + NUM_DENSE])
    d_len = d_end - d_start
    negative = (buf[d_start] == 45) & (d_len > 0)
    digits = d_len - negative
    t = (loads[d_end - 8] ^ _C30) & _KEEP[np.minimum(digits, 8)]  # digit bytes as 0..9, the rest 0
    dense_ok = ((t & _F0) == 0) & (((t + _C06) & _F0) == 0)
    t = (t * _U(10) + (t >> _U(8))) & _M16
    t = (t * _U(100) + (t >> _U(16))) & _M32
    t = (t * _U(10000) + (t >> _U(32))) & _M64
    value = t.astype(np.float64)
    dense_ok &= ~(negative & (digits == 0))
    long_fields = np.argwhere(digits > 8)
    for r, f in long_fields:  # rare: more than 8 digits
        text = bytes(buf[d_start[r, f]:d_end[r, f]])
        if digits[r, f] <= MAX_DENSE_DIGITS and _DENSE_RE.fullmatch(text):
            value[r, f] = abs(int(text))
            dense_ok[r, f] = True
        else:
            dense_ok[r, f] = False
    value[negative] *= -1
    dense = value.astype(np.float32)
    dense[d_len == 0] = np.nan
    ok &= dense_ok.all(axis=1)

    # categorical: "" or 8 hex digits, from one 8-byte load at the field's start
    c_start = np.ascontiguousarray(starts[:, 1 + NUM_DENSE:])
    c_len = ends[:, 1 + NUM_DENSE:] - c_start
    word = loads[c_start]
    ascii_ok = (word & _HIGH) == 0
    word &= np.where(ascii_ok, _ALL, _U(0))
    hexchar = _in_range(word, 0x30, 0x39) | _in_range(word | _C20, 0x61, 0x66)
    missing = c_len == 0
    ok &= (missing | ((c_len == 8) & ascii_ok & (hexchar == _HIGH))).all(axis=1)
    nib = (word & _0F) + ((word >> _U(6)) & _ONES) * _U(9)
    nib = (nib * _U(16) + (nib >> _U(8))) & _M16
    nib = (nib * _U(256) + (nib >> _U(16))) & _M32
    nib = (nib * _U(65536) + (nib >> _U(32))) & _M64
    values = np.where(missing, _U(0), nib).astype(np.uint32)

    good_rows = rows[ok]
    bad_lines = np.setdiff1d(np.arange(lines), good_rows, assume_unique=True) if len(good_rows) < lines \
        else np.zeros(0, np.int64)
    bad_text = [bytes(buf[line_start[i]:line_end[i]]) for i in bad_lines]
    return ParsedChunk(lines, good_rows.astype(np.int64), label[ok], dense[ok], values[ok], missing[ok],
                       bad_lines.astype(np.int64), bad_text)


_DENSE_RE = re.compile(rb"-?[0-9]{1,%d}" % MAX_DENSE_DIGITS)
_HEX_RE = re.compile(rb"[0-9a-fA-F]{8}")
_INTEGER_RE = re.compile(rb"-?[0-9]+")


def explain_line(line: bytes) -> tuple[str, str]:
    """Why a line is not a valid row: ``(kind, reason)``, kind one of :data:`BAD_KINDS`.

    ``line`` excludes the LF.  Raises ``ValueError`` for a valid line (a parser bug).
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line.strip():
        return "blank_line", "blank line"
    fields = line.split(b"\t")
    if len(fields) != NUM_FIELDS:
        return "field_count", f"{len(fields)} tab-separated fields, expected {NUM_FIELDS}"
    if fields[0] not in (b"0", b"1"):
        return "label", f"label is {_show(fields[0])}, expected 0 or 1"
    for name, text in zip(FIELD_NAMES[1:1 + NUM_DENSE], fields[1:1 + NUM_DENSE]):
        if text and not _DENSE_RE.fullmatch(text):
            if _INTEGER_RE.fullmatch(text):
                return "dense", f"{name} is {_show(text)}, more than {MAX_DENSE_DIGITS} digits"
            return "dense", f"{name} is {_show(text)}, not an integer"
    for name, text in zip(FIELD_NAMES[1 + NUM_DENSE:], fields[1 + NUM_DENSE:]):
        if text and not _HEX_RE.fullmatch(text):
            return "categorical", f"{name} is {_show(text)}, not 8 hex digits"
    raise ValueError(f"valid line reported as bad: {line[:200]!r}")


def _show(text: bytes, limit: int = 24) -> str:
    shown = repr(text[:limit].decode("utf-8", "backslashreplace"))
    return shown + ("..." if len(text) > limit else "")


# -- files ---------------------------------------------------------------------------------
def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def check_input(path: str) -> int:
    """The size of input file ``path``, or a UserError saying why it cannot be read."""
    if not os.path.exists(path):
        raise UserError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"input {path} is a directory, expected a Criteo TSV file (plain or .gz)")
    try:
        with open(path, "rb"):
            pass
        size = os.path.getsize(path)
    except OSError as e:
        raise UserError(f"cannot read input file {path}: {e.strerror or e}") from None
    if size == 0:
        raise UserError(f"input file {path} is empty (0 bytes): no rows to convert")
    return size


class _HashingReader(io.RawIOBase):
    """A raw binary file that hashes (sha256) and counts the bytes read through it."""

    def __init__(self, raw, hashing: bool = True):
        super().__init__()
        self.raw = raw
        self.sha256 = hashlib.sha256() if hashing else None
        self.bytes_read = 0

    def readinto(self, b):
        n = self.raw.readinto(b)
        if n:
            if self.sha256 is not None:
                self.sha256.update(memoryview(b)[:n])
            self.bytes_read += n
        return n

    def readable(self):
        return True

    def close(self):
        self.raw.close()
        super().close()


class ChunkReader:
    """A file's contents as chunks of whole lines: iterate for ``(first_line, pieces)``.

    ``first_line`` is the 0-based index of the chunk's first line in the file;
    ``pieces`` is a list of bytes objects whose concatenation is whole lines, each
    ending in LF (a final line without one gets it).  Plain or gzip, detected by
    the magic bytes; a UTF-8 byte order mark at the start is dropped.  After a
    complete iteration ``lines`` and ``sha256`` (of the bytes on disk; None with
    ``checksum=False``) are set.  ``on_bytes(n)`` is told the bytes on disk consumed
    so far.  Truncated or corrupt gzip (with the last whole line before the damage)
    and lines over 1 MiB are UserErrors naming the file.
    """

    def __init__(self, path: str, chunk_bytes: int = CHUNK_BYTES,
                 on_bytes: Optional[Callable[[int], None]] = None, checksum: bool = True):
        self.path = path
        self.size = check_input(path)
        self.chunk_bytes = chunk_bytes
        self.on_bytes = on_bytes
        self.checksum = checksum
        self.lines: Optional[int] = None
        self.sha256: Optional[str] = None

    def __iter__(self) -> Iterator[tuple[int, list]]:
        path = self.path
        lines, started = 0, False
        gz = is_gzip(path)
        raw = _HashingReader(open(path, "rb", buffering=0), self.checksum)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else io.BufferedReader(raw, 1 << 20)
        decoded: list = []  # the chunk being read, in pieces (gzip: what decompressed before an error)
        try:
            while True:
                try:
                    data = _read(stream, self.chunk_bytes, gz, decoded)
                    if not started and data.startswith(BOM):  # a byte order mark: no part of line 1
                        data = data[len(BOM):] or _read(stream, self.chunk_bytes, gz, decoded)
                    started = True
                    rest = stream.readline(MAX_LINE_BYTES) if data and not data.endswith(NL) else b""
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    after = lines + sum(piece.count(NL) for piece in decoded)  # whole lines that decompressed
                    if isinstance(e, EOFError):
                        raise UserError(f"{path}: truncated gzip file: its text breaks off after line {after:,} "
                                        f"(the compressed stream ends early: {e})") from None
                    raise UserError(f"{path}: corrupt gzip file: the data is damaged after line {after:,} "
                                    f"(near compressed byte {raw.bytes_read:,}: {e})") from None
                except OSError as e:
                    raise UserError(f"cannot read {path}: {e.strerror or e}") from None
                if self.on_bytes is not None:
                    self.on_bytes(raw.bytes_read)
                if not data:
                    break
                pieces = [data, rest] if rest else [data]
                if not (rest or data).endswith(NL):
                    if len(rest) >= MAX_LINE_BYTES:
                        line = lines + data.count(NL) + 1
                        raise UserError(f"{path} line {line:,} is longer than {MAX_LINE_BYTES:,} bytes: "
                                        f"not a Criteo TSV file")
                    pieces.append(NL)  # the last line, without its LF
                first = lines
                lines += data.count(NL) + (1 if rest or not data.endswith(NL) else 0)
                yield first, pieces
        finally:
            stream.close()
            raw.close()
        self.lines = lines
        self.sha256 = raw.sha256.hexdigest() if raw.sha256 is not None else None


def _read(stream, size: int, gz: bool, decoded: list) -> bytes:
    """Up to ``size`` bytes of ``stream`` (fewer only at its end).  Gzip is read a piece at a
    time into ``decoded`` (emptied first) so that the text before a truncation or damage
    stays known."""
    decoded.clear()
    if not gz:
        decoded.append(stream.read(size))
        return decoded[0]
    got = 0
    while got < size:
        piece = stream.read1(size - got)
        if not piece:
            break
        decoded.append(piece)
        got += len(piece)
    return b"".join(decoded)


def count_lines(path: str, on_bytes: Optional[Callable[[int], None]] = None) -> ChunkReader:
    """Count the lines (rows, bad ones included) of a file in one fast pass; also its sha256."""
    reader = ChunkReader(path, chunk_bytes=16 << 20, on_bytes=on_bytes)
    for _ in reader:
        pass
    return reader
