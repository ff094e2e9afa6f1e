"""Helpers for the Criteo tests: raw lines made by hand, and a plain-Python reading of
them that shares no code with ``pipelines`` (the independent side of each comparison)."""
from __future__ import annotations

import collections
import math
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REAL_FILES = ("kaggle_split/train.txt", "kaggle_split/test.txt", "criteo_1tb_day0_head1000.txt",
              "criteo_kaggle_train_head10k.txt", "criteo_kaggle_train_idsample.txt")


def line(label=0, dense: Optional[Sequence] = None, cats: Optional[Sequence] = None) -> str:
    """A raw row; ``dense`` 13 ints or None (missing), ``cats`` 26 hex strings or "" (missing)."""
    dense = [1] * 13 if dense is None else dense
    cats = ["%08x" % (0x1000 + i) for i in range(26)] if cats is None else cats
    assert len(dense) == 13 and len(cats) == 26
    return "\t".join([str(label)] + ["" if d is None else str(d) for d in dense] + list(cats))


def numbered_lines(n: int, start: int = 0, seed: int = 0) -> list[str]:
    """``n`` valid rows whose I1 is the row number (``start`` + i), the rest varied."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        dense = [i] + [rng.choice([None, -1, 0, 3, 17, 250, 99999]) for _ in range(12)]
        cats = [rng.choice(["", "%08x" % rng.randrange(1 << 32), "0000abcd", "ABCDEF12"]) for _ in range(26)]
        out.append(line(rng.randrange(2), dense, cats))
    return out


def write_lines(path: Path, lines: Sequence[str], ending: str = "\n") -> Path:
    path.write_bytes("".join(l + ending for l in lines).encode())
    return path


def python_dense(text: str) -> np.float32:
    """The dense transform, written out: float32 count, log1p in float64 of max(x, 0)."""
    if text == "":
        return np.float32(0.0)
    return np.float32(math.log1p(max(float(np.float32(int(text))), 0.0)))


def python_fields(raw: str):
    """(label, [13 dense text], [26 categorical text]) of a raw line (CRLF tolerated)."""
    fields = raw.rstrip("\n").rstrip("\r").split("\t")
    assert len(fields) == 40
    return fields[0], fields[1:14], fields[14:]


def python_rows(lines: Sequence[str], ids) -> np.ndarray:
    """Rows as the converter should write them: [n, 40] int32 (label, dense float32 bits, ids).

    ``ids(feature, text)`` gives the id of categorical text (the mapping under test).
    """
    out = np.zeros((len(lines), 40), np.int32)
    as_float = out.view(np.float32)
    for r, raw in enumerate(lines):
        label, dense, cats = python_fields(raw)
        as_float[r, 0] = float(int(label))
        for j, text in enumerate(dense):
            as_float[r, 1 + j] = python_dense(text)
        for j, text in enumerate(cats):
            out[r, 14 + j] = ids(j, text)
    return out


def hash_ids(buckets: int):
    return lambda feature, text: 0 if text == "" else 1 + int(text, 16) % buckets


def vocabulary_ids(train_lines: Sequence[str], threshold: int):
    """Ids of the frequency-threshold vocabulary, counted in plain Python."""
    counts = [collections.Counter() for _ in range(26)]
    for raw in train_lines:
        for j, text in enumerate(python_fields(raw)[2]):
            if text:
                counts[j][int(text, 16)] += 1
    kept = [sorted(v for v, n in c.items() if n >= threshold) for c in counts]
    index = [{v: i + 2 for i, v in enumerate(k)} for k in kept]

    def ids(feature, text):
        if text == "":
            return 0
        return index[feature].get(int(text, 16), 1)

    ids.sizes = [len(k) + 2 for k in kept]
    return ids


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Rows in a canonical order (to compare multisets of rows)."""
    rows = np.ascontiguousarray(rows)
    return rows[np.lexsort(rows.T[::-1])]


def dataset_rows(dataset) -> np.ndarray:
    """All rows of a tf.data dataset of (features, label) batches, as [n, 40] int32 words."""
    parts = []
    for x, y in dataset:
        n = y.shape[0]
        rows = np.zeros((n, 40), np.int32)
        rows.view(np.float32)[:, 0] = y.numpy()[:, 0]
        rows.view(np.float32)[:, 1:14] = x["dense"].numpy()
        rows[:, 14:] = x["sparse"].numpy()
        parts.append(rows)
    return np.concatenate(parts)
