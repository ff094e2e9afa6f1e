"""Categorical values -> ids: hashing or a vocabulary of the training split.

Id 0 is missing, id 1 rare (below ``--min-frequency``) or unseen.  Vocabularies are
saved as hex text files beside the shards.  See docs/data.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import (
    CATEGORICAL_NAMES,
    DENSE_FORMULA,
    MAX_TABLE_ROWS,
    MISSING_ID,
    NUM_CATEGORICAL,
    RARE_ID,
)
from tfdlrm.pipelines.manifest import bytes_digest

HASH_KINDS = ("hash", "vocabulary")
VOCABULARY_DIR = "vocabulary"


class CategoricalMapping:
    """How hex values become ids: hashing into N buckets, or a frequency-threshold vocabulary.

    ``vocabulary``: per feature a sorted uint32 array of the kept values (vocabulary
    mode).  Build one with :meth:`hashing` or :meth:`from_counts`; save and load it
    with :meth:`manifest_entry` / :meth:`save_vocabulary` and :meth:`load`.
    """

    def __init__(self, kind: str, hash_buckets: Optional[int] = None, min_frequency: Optional[int] = None,
                 vocabulary: Optional[Sequence[np.ndarray]] = None):
        if kind not in HASH_KINDS:
            raise UserError(f"categorical mapping must be one of {', '.join(HASH_KINDS)}, got {kind!r}")
        self.kind = kind
        self.hash_buckets = hash_buckets
        self.min_frequency = min_frequency
        self.vocabulary = None if vocabulary is None else tuple(np.asarray(v, np.uint32) for v in vocabulary)
        if kind == "hash":
            check_hash_buckets(hash_buckets)
        else:
            check_min_frequency(min_frequency)
            if self.vocabulary is None or len(self.vocabulary) != NUM_CATEGORICAL:
                raise ValueError("vocabulary mode needs one sorted array of values per categorical feature")

    # -- construction ------------------------------------------------------------------
    @classmethod
    def hashing(cls, buckets: int) -> "CategoricalMapping":
        return cls("hash", hash_buckets=buckets)

    @classmethod
    def from_counts(cls, counts: Sequence[tuple[np.ndarray, np.ndarray]], min_frequency: int) -> "CategoricalMapping":
        """Keep, per feature, the values counted at least ``min_frequency`` times.

        ``counts``: per feature ``(values, counts)`` with ``values`` sorted and unique.
        """
        check_min_frequency(min_frequency)
        kept = [np.asarray(values, np.uint32)[np.asarray(n) >= min_frequency] for values, n in counts]
        return cls("vocabulary", min_frequency=min_frequency, vocabulary=kept)

    # -- what the model needs -------------------------------------------------------------
    def table_sizes(self) -> tuple[int, ...]:
        if self.kind == "hash":
            return (self.hash_buckets + 1,) * NUM_CATEGORICAL
        return tuple(len(v) + 2 for v in self.vocabulary)

    def ids_np(self, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """The numpy twin of :class:`CategoricalLookup`: int32 ids [n, 26].

        ``values``: uint32 [n, 26] parsed hex values; ``missing``: bool [n, 26].
        Vocabulary lookups go through pandas hash indexes (about twice as fast as a
        binary search on Kaggle-sized vocabularies); call :meth:`prepare` once before
        using the mapping from several threads.
        """
        if self.kind == "hash":
            ids = (values % np.uint32(self.hash_buckets)).astype(np.int32) + 1
        else:
            columns = np.ascontiguousarray(values.T)
            ids_t = np.empty(columns.shape, np.int32)
            for f, index in enumerate(self.prepare()):
                position = index.get_indexer(columns[f])
                ids_t[f] = np.where(position >= 0, position + 2, RARE_ID)
            ids = ids_t.T.copy()
        ids[missing] = MISSING_ID
        return ids

    def prepare(self) -> list:
        """The per-feature lookup indexes (vocabulary mode), built on first use."""
        if getattr(self, "_indexes", None) is None:
            import pandas as pd

            indexes = [pd.Index(keys) for keys in self.vocabulary]
            for index in indexes:  # build the hash tables now, not concurrently in worker threads
                index.get_indexer(index[:1])
            self._indexes = indexes
        return self._indexes

    # -- files --------------------------------------------------------------------------
    def manifest_entry(self) -> dict:
        vocab = self.kind == "vocabulary"
        return {
            "categorical": self.kind,
            "hash_buckets": self.hash_buckets,
            "min_frequency": self.min_frequency,
            "missing_id": MISSING_ID,
            "rare_id": RARE_ID if vocab else None,
            "vocabulary_dir": VOCABULARY_DIR if vocab else None,
            "vocabulary_sizes": [len(v) for v in self.vocabulary] if vocab else None,
            "dense": DENSE_FORMULA,
        }

    def save_vocabulary(self, dataset_dir: str | os.PathLike) -> list[dict]:
        """Write ``vocabulary/C1.txt`` .. (vocabulary mode; nothing for hashing); returns
        :meth:`vocabulary_records`."""
        if self.kind != "vocabulary":
            return []
        folder = Path(dataset_dir) / VOCABULARY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for name, keys in zip(CATEGORICAL_NAMES, self.vocabulary):
            data = hex_lines(keys)
            (folder / f"{name}.txt").write_bytes(data)
            records.append({"path": f"{VOCABULARY_DIR}/{name}.txt", **bytes_digest(data)})
        return records

    def vocabulary_records(self) -> list[dict]:
        """The manifest's ``vocabulary_files``: per file that :meth:`save_vocabulary` writes, its
        path in the dataset, size and sha256 (empty for hashing)."""
        if self.kind != "vocabulary":
            return []
        return [{"path": f"{VOCABULARY_DIR}/{name}.txt", **bytes_digest(hex_lines(keys))}
                for name, keys in zip(CATEGORICAL_NAMES, self.vocabulary)]

    @classmethod
    def load(cls, dataset_dir: str | os.PathLike, entry: dict) -> "CategoricalMapping":
        """The mapping a converted dataset was written with (``entry`` = manifest ``"mapping"``)."""
        kind = entry.get("categorical")
        if kind == "hash":
            return cls.hashing(int(entry["hash_buckets"]))
        if kind != "vocabulary":
            raise UserError(f"{dataset_dir}: manifest has an unknown categorical mapping {kind!r}")
        folder = Path(dataset_dir) / (entry.get("vocabulary_dir") or VOCABULARY_DIR)
        vocabulary = []
        for name, size in zip(CATEGORICAL_NAMES, entry["vocabulary_sizes"]):
            path = folder / f"{name}.txt"
            try:
                data = path.read_bytes()
            except OSError as e:
                raise UserError(f"{dataset_dir}: cannot read vocabulary file {path}: {e.strerror or e}") from None
            keys = parse_hex_lines(data, path)
            if len(keys) != size:
                raise UserError(f"{path} has {len(keys)} values but the manifest says {size}: the dataset is damaged")
            vocabulary.append(keys)
        return cls("vocabulary", min_frequency=int(entry["min_frequency"]), vocabulary=vocabulary)

    def vocabulary_files(self, dataset_dir: str | os.PathLike) -> list[str]:
        return [str(Path(dataset_dir) / VOCABULARY_DIR / f"{name}.txt") for name in CATEGORICAL_NAMES]

    def describe(self) -> str:
        if self.kind == "hash":
            return f"hashing into {self.hash_buckets:,} buckets (+1 missing id)"
        return (f"vocabulary of values seen >= {self.min_frequency} times "
                f"({sum(len(v) for v in self.vocabulary):,} values; +1 missing, +1 rare id per feature)")


def check_hash_buckets(buckets) -> int:
    if not isinstance(buckets, (int, np.integer)) or isinstance(buckets, bool) or not 1 <= buckets < MAX_TABLE_ROWS:
        raise UserError(f"--hash-buckets must be an integer in [1, {MAX_TABLE_ROWS - 1}], got {buckets!r}")
    return int(buckets)


def check_min_frequency(threshold) -> int:
    if not isinstance(threshold, (int, np.integer)) or isinstance(threshold, bool) or threshold < 1:
        raise UserError(f"--min-frequency must be an integer >= 1, got {threshold!r}")
    return int(threshold)


HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def hex_lines(keys: np.ndarray) -> bytes:
    """Values as lines of 8 lowercase hex digits (the vocabulary file format)."""
    keys = np.asarray(keys, np.uint32)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    out = np.empty((len(keys), 9), np.uint8)
    out[:, :8] = HEX_DIGITS[(keys[:, None] >> shifts) & 15]
    out[:, 8] = 10
    return out.tobytes()


def parse_hex_lines(data: bytes, path) -> np.ndarray:
    """The inverse of :func:`hex_lines`; refuses anything else."""
    if len(data) % 9:
        raise UserError(f"{path} is not a tfdlrm vocabulary file (lines of 8 hex digits)")
    rows = np.frombuffer(data, np.uint8).reshape(-1, 9)
    lut = np.full(256, 255, np.uint8)
    lut[HEX_DIGITS] = np.arange(16)
    nibbles = lut[rows[:, :8]]
    if (nibbles == 255).any() or (rows[:, 8] != 10).any():
        raise UserError(f"{path} is not a tfdlrm vocabulary file (lines of 8 hex digits)")
    keys = (nibbles.astype(np.uint32) << np.arange(28, -1, -4, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    if len(keys) > 1 and not (np.diff(keys.astype(np.int64)) > 0).all():
        raise UserError(f"{path}: vocabulary values must be unique and ascending")
    return keys


class ValueCounter:
    """Counts of uint32 values, for one feature: sorted runs, merged as they grow.

    Memory is bounded: once the runs in memory hold more than ``max_entries`` distinct
    values, they are merged and spilled to ``spill_dir`` in :data:`PARTITIONS` files by the
    values' top bits (Criteo's values are hashes, so the parts are about equal), and
    :meth:`result` merges one part at a time, keeping only the values counted at least
    ``threshold`` times.  Without ``spill_dir`` everything stays in memory.
    """

    FLUSH = 1 << 20  # pending keys per feature before they are merged (12 MB)
    MAX_ENTRIES = 1 << 22  # distinct values held in memory per feature before spilling (48 MB)
    PARTITIONS = 16

    def __init__(self, spill_dir: Optional[Path] = None, max_entries: Optional[int] = None):
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.spill_dir = spill_dir
        self.max_entries = max_entries or self.MAX_ENTRIES
        self.spilled = 0  # runs written to disk

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
        if self.spill_dir is not None and sum(len(k) for k, _ in self.runs) > self.max_entries:
            self._spill()

    def _spill(self) -> None:
        keys, counts = _merge_counts(self.runs) if len(self.runs) > 1 else self.runs[0]
        self.runs = []
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        bounds = np.searchsorted(keys, self._partition_starts())
        for part in range(self.PARTITIONS):
            lo, hi = bounds[part], bounds[part + 1]
            if hi > lo:
                with open(self.spill_dir / f"{part:02d}.keys", "ab") as f:
                    f.write(keys[lo:hi].astype("<u4").tobytes())
                with open(self.spill_dir / f"{part:02d}.counts", "ab") as f:
                    f.write(counts[lo:hi].astype("<i8").tobytes())
        self.spilled += 1

    def _partition_starts(self) -> np.ndarray:
        step = (1 << 32) // self.PARTITIONS
        return np.array([p * step for p in range(self.PARTITIONS)] + [1 << 32], np.uint64)

    def result(self, threshold: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(values, counts)`` of the values counted at least ``threshold`` times, values
        sorted and unique."""
        self._flush()
        if self.spilled:
            if self.runs:
                self._spill()
            kept_keys, kept_counts = [], []
            for part in range(self.PARTITIONS):  # one part in memory at a time, in value order
                path = self.spill_dir / f"{part:02d}.keys"
                if not path.exists():
                    continue
                keys = np.fromfile(path, "<u4")
                counts = np.fromfile(self.spill_dir / f"{part:02d}.counts", "<i8")
                keys, counts = _merge_counts([(keys, counts)])
                keep = counts >= threshold
                kept_keys.append(keys[keep].astype(np.uint32))
                kept_counts.append(counts[keep])
                path.unlink()
                (self.spill_dir / f"{part:02d}.counts").unlink()
            return np.concatenate(kept_keys), np.concatenate(kept_counts)
        if not self.runs:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        keys, counts = _merge_counts(self.runs) if len(self.runs) > 1 else self.runs[0]
        keep = counts >= threshold
        return keys[keep], counts[keep]


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts]).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts) if len(keys) else counts
