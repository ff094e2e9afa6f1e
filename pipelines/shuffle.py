"""Spools: rows staged on disk between the converter's passes, shuffled in buckets."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHUFFLE_BUCKET_ROWS = 1 << 20


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
