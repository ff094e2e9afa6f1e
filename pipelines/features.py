"""The Criteo schema and the mapping of raw values to model inputs: the ONE definition.

A raw Criteo row is one line of 40 tab-separated fields::

    label  I1 .. I13  C1 .. C26
    0|1    integers   8 hex digits (a 32-bit hashed value)
           (may be negative; empty = missing)

Model inputs (what every tfdlrm data source yields)::

    dense   float32 [batch, 13]   log(1 + max(x, 0)); missing -> 0
    sparse  int64   [batch, 26]   one id per categorical feature, in [0, table_size)
    label   float32 [batch, 1]

Dense transform
    ``x`` is the count as float32 (what a serving request carries; counts above
    2**24 round as float32 does), NaN = missing.  The result is
    ``float32(log1p(max(float64(x), 0)))``, and 0 for missing.  Computing in float64
    makes the float32 result independent of how a library vectorises ``log1p``.
    Infinities are not counts: +inf and -inf are missing too (0), as NaN is, so a
    request can never feed an infinite value to the model.  (Raw TSV integers have
    at most 18 digits, so converted data never held one: this changes no dataset.)

Categorical mapping, chosen at conversion and recorded in the manifest
    ``hash`` (``--hash-buckets N``): id 0 = missing, ``1 + (v mod N)`` for the value
        ``v`` of the 8 hex digits (case-insensitive).  Every table has N + 1 rows.
        N = the reference DLRM's ``--max-ind-range``, except that missing has its
        own id.
    ``vocabulary`` (``--min-frequency T``): id 0 = missing, id 1 = every value seen
        fewer than T times in the training split (or never seen: values first met in
        the held-out split or at serving time), ids 2 .. K + 1 = the K values seen at
        least T times, in ascending order of value.  Table f has K_f + 2 rows.

What a converted dataset keeps for the serving export (``tfdlrm/export.py``)
    * ``manifest.json`` key ``"mapping"``::

        {"categorical": "hash" | "vocabulary",
         "hash_buckets": N | null, "min_frequency": T | null,
         "missing_id": 0, "rare_id": 1 | null,
         "vocabulary_dir": "vocabulary" | null, "vocabulary_sizes": [K_1 .. K_26] | null,
         "dense": "<the formula above>"}

      and ``"table_sizes"``: the 26 table row counts.
    * ``vocabulary/C1.txt`` .. ``C26.txt`` (vocabulary mode): the kept values of
      that feature, one a line, as 8 lowercase hex digits in ascending order, each
      line ending in ``\\n``.  Line i (0-based) is id i + 2.  Readable by
      ``tf.lookup.TextFileInitializer`` (whole line -> line number), which is what
      :class:`CategoricalLookup` uses, so a SavedModel carries the files as assets.

The TensorFlow functions here (``dense_transform``, ``parse_hex``,
:class:`CategoricalLookup`, :class:`RawFeatures`) run inside a graph and take raw
inputs as a serving request would: ``dense`` float32 [None, 13] raw counts
(NaN or negative = missing or clamped), ``categorical`` string [None, 26] raw hex
(empty = missing).  The converter uses numpy twins (``dense_transform_np``,
``CategoricalMapping.ids_np``, and the byte-level hex parser in
``pipelines/tsv.py``) for speed; ``tests/test_features.py`` proves the twins equal
to the TensorFlow functions on every real row in ``../shared``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
LABEL_NAME = "label"
DENSE_NAMES = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
CATEGORICAL_NAMES = tuple(f"C{i}" for i in range(1, NUM_CATEGORICAL + 1))
FIELD_NAMES = (LABEL_NAME, *DENSE_NAMES, *CATEGORICAL_NAMES)

MISSING_ID = 0
RARE_ID = 1  # vocabulary mode: values seen fewer than T times, or never
HASH_KINDS = ("hash", "vocabulary")
VOCABULARY_DIR = "vocabulary"
# Ids are stored as int32; a table must stay below that.
MAX_TABLE_ROWS = 2**31 - 1
DENSE_FORMULA = "float32(log1p(max(float64(float32(x)), 0))); missing (empty, NaN, +-inf) -> 0"


# -- dense ---------------------------------------------------------------------------
def dense_transform(x):
    """Model dense input from raw counts: TensorFlow, graph-safe.

    ``x``: float32 [..., 13] raw counts, NaN (or an infinity) = missing.  Returns
    float32 of the same shape.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    wide = tf.cast(x, tf.float64)
    y = tf.math.log1p(tf.maximum(tf.where(tf.math.is_finite(wide), wide, tf.zeros_like(wide)), 0.0))
    return tf.cast(y, tf.float32)


def dense_transform_np(x: np.ndarray) -> np.ndarray:
    """The numpy twin of :func:`dense_transform` (the converter's)."""
    wide = np.asarray(x, np.float32).astype(np.float64)
    wide[~np.isfinite(wide)] = 0.0
    return np.log1p(np.maximum(wide, 0.0)).astype(np.float32)


# -- categorical -----------------------------------------------------------------------
def parse_hex(strings):
    """Parse raw categorical strings: TensorFlow, graph-safe.

    ``strings``: string tensor of any shape.  Returns ``(values, missing, valid)``:
    int64 values in [0, 2**32) (0 where missing or invalid), and bool tensors.
    Valid means empty (missing) or exactly 8 hex digits, either case.
    """
    strings = tf.convert_to_tensor(strings, tf.string)
    length = tf.strings.length(strings)
    missing = tf.equal(length, 0)
    raw = tf.cast(tf.io.decode_raw(strings, tf.uint8, fixed_length=8), tf.int32)  # [..., 8], zero-padded
    digit = (raw >= 48) & (raw <= 57)
    lower = (raw >= 97) & (raw <= 102)
    upper = (raw >= 65) & (raw <= 70)
    nibble = tf.where(digit, raw - 48, tf.where(lower, raw - 87, tf.where(upper, raw - 55, tf.zeros_like(raw))))
    valid_chars = tf.reduce_all(digit | lower | upper, axis=-1)
    well_formed = tf.equal(length, 8) & valid_chars
    weights = tf.constant([16**k for k in range(7, -1, -1)], tf.int64)
    values = tf.reduce_sum(tf.cast(nibble, tf.int64) * weights, axis=-1)
    values = tf.where(well_formed, values, tf.zeros_like(values))
    return values, missing, missing | well_formed


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

    def save_vocabulary(self, dataset_dir: str | os.PathLike) -> None:
        """Write ``vocabulary/C1.txt`` .. (vocabulary mode; nothing for hashing)."""
        if self.kind != "vocabulary":
            return
        folder = Path(dataset_dir) / VOCABULARY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for name, keys in zip(CATEGORICAL_NAMES, self.vocabulary):
            (folder / f"{name}.txt").write_bytes(hex_lines(keys))

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


# -- TensorFlow lookups (serving) -----------------------------------------------------------
class CategoricalLookup(tf.Module):
    """Raw categorical strings [None, 26] -> int64 ids [None, 26], as a TensorFlow module.

    ``on_invalid``: ``"error"`` (default) fails the call with a ``tfdlrm:`` message
    for a value that is neither empty nor 8 hex digits; ``"missing"`` maps it to the
    missing id.  Vocabulary tables are ``StaticHashTable``s initialised from the
    dataset's vocabulary files (SavedModel assets when exported).
    """

    def __init__(self, mapping: CategoricalMapping, dataset_dir: Optional[str] = None, on_invalid: str = "error"):
        super().__init__(name="categorical_lookup")
        if on_invalid not in ("error", "missing"):
            raise UserError(f"on_invalid must be 'error' or 'missing', got {on_invalid!r}")
        self.kind = mapping.kind
        self.hash_buckets = mapping.hash_buckets
        self.on_invalid = on_invalid
        self.tables = []
        if mapping.kind == "vocabulary":
            if dataset_dir is None:
                raise ValueError("vocabulary lookups need the dataset directory (the vocabulary files)")
            for path, keys in zip(mapping.vocabulary_files(dataset_dir), mapping.vocabulary):
                if len(keys) == 0:
                    self.tables.append(None)
                    continue
                init = tf.lookup.TextFileInitializer(
                    path, key_dtype=tf.string, key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
                    value_dtype=tf.int64, value_index=tf.lookup.TextFileIndex.LINE_NUMBER)
                self.tables.append(tf.lookup.StaticHashTable(init, default_value=-1))

    def __call__(self, categorical):
        categorical = tf.convert_to_tensor(categorical, tf.string)
        values, missing, valid = parse_hex(categorical)
        if self.on_invalid == "error":
            check = tf.debugging.Assert(tf.reduce_all(valid), [
                "tfdlrm: categorical values must be empty or 8 hex digits; got",
                tf.boolean_mask(categorical, tf.logical_not(valid))[:3]])
            with tf.control_dependencies([check]):
                values = tf.identity(values)
        else:
            missing = missing | tf.logical_not(valid)
        if self.kind == "hash":
            ids = 1 + tf.math.floormod(values, tf.constant(self.hash_buckets, tf.int64))
        else:
            keys = tf.strings.lower(categorical)
            columns = []
            for f, table in enumerate(self.tables):
                if table is None:
                    columns.append(tf.fill(tf.shape(keys[..., f]), tf.constant(RARE_ID, tf.int64)))
                    continue
                line = table.lookup(keys[..., f])
                columns.append(tf.where(line >= 0, line + 2, tf.constant(RARE_ID, tf.int64)))
            ids = tf.stack(columns, axis=-1)
        return tf.where(missing, tf.constant(MISSING_ID, tf.int64), ids)


class RawFeatures(tf.Module):
    """Raw request features -> model inputs, as a TensorFlow module (the serving transform).

    ``RawFeatures.from_dataset(dir)(dense, categorical)`` returns
    ``{"dense": float32 [None, 13], "sparse": int64 [None, 26]}`` from ``dense`` float32
    [None, 13] raw counts (NaN = missing) and ``categorical`` string [None, 26] raw hex
    (empty = missing): exactly what the converter wrote for the same raw row.
    """

    def __init__(self, mapping: CategoricalMapping, dataset_dir: Optional[str] = None, on_invalid: str = "error"):
        super().__init__(name="raw_features")
        self.lookup = CategoricalLookup(mapping, dataset_dir, on_invalid)

    @classmethod
    def from_dataset(cls, dataset_dir: str, on_invalid: str = "error") -> "RawFeatures":
        from pipelines.reader import load_manifest

        manifest = load_manifest(dataset_dir)
        return cls(CategoricalMapping.load(dataset_dir, manifest["mapping"]), dataset_dir, on_invalid)

    def __call__(self, dense, categorical) -> dict:
        return {"dense": dense_transform(dense), "sparse": self.lookup(categorical)}


# -- tf.Example: the raw-feature schema of serialized requests ---------------------------------
# One tf.train.Example per raw row (what the serving export's ``examples`` signature
# parses, and what a client builds with :func:`raw_example`):
#
#   I1 .. I13   float_list, at most one value: the raw count.  Missing: the feature
#               absent, an empty list, or NaN (and, as for every request, +-inf;
#               negative counts become 0 as in training).  Integers go in as floats
#               (exact up to 2**24, as the float32 dense input); an int64_list is
#               refused with TensorFlow's "Data types don't match" error.
#   C1 .. C26   bytes_list, at most one value: the raw 8 hex digits (either case).
#               Missing: the feature absent, an empty list, or b"".
#   label       optional, any type, ignored (so logged training rows can be scored as
#               they are); so is any other feature.
#
# More than one value in a feature fails the request with a "tfdlrm:" message.
EXAMPLE_DENSE_DTYPE = tf.float32
EXAMPLE_CATEGORICAL_DTYPE = tf.string


def example_features_spec() -> dict:
    """The ``tf.io.parse_example`` spec of the raw-feature schema (ragged: absent = empty)."""
    spec = {name: tf.io.RaggedFeature(EXAMPLE_DENSE_DTYPE) for name in DENSE_NAMES}
    spec.update({name: tf.io.RaggedFeature(EXAMPLE_CATEGORICAL_DTYPE) for name in CATEGORICAL_NAMES})
    return spec


def parse_raw_examples(serialized):
    """Serialized raw-feature ``tf.Example`` protos -> the raw request inputs: TensorFlow, graph-safe.

    ``serialized``: string [batch].  Returns ``(dense, categorical)``: float32
    [batch, 13] raw counts with NaN where missing, and string [batch, 26] raw hex with
    "" where missing, which :class:`RawFeatures` maps as it maps any request.
    """
    serialized = tf.convert_to_tensor(serialized, tf.string)
    parsed = tf.io.parse_example(serialized, example_features_spec())
    checks, columns = [], {}
    for name in (*DENSE_NAMES, *CATEGORICAL_NAMES):
        values = parsed[name]  # ragged [batch, None]
        checks.append(tf.debugging.Assert(
            tf.reduce_all(values.row_lengths() <= 1),
            [f"tfdlrm: tf.Example feature {name} must hold at most one value; an example has",
             tf.reduce_max(values.row_lengths()), "values"]))
        default = float("nan") if name in DENSE_NAMES else ""
        columns[name] = values.to_tensor(default_value=default, shape=[None, 1])
    with tf.control_dependencies(checks):
        dense = tf.identity(tf.concat([columns[name] for name in DENSE_NAMES], axis=1))
        categorical = tf.identity(tf.concat([columns[name] for name in CATEGORICAL_NAMES], axis=1))
    return dense, categorical


def raw_example(dense: Sequence, categorical: Sequence, label=None) -> "tf.train.Example":
    """One raw row as a ``tf.train.Example`` in the schema above (a client's helper).

    ``dense``: 13 counts, None or NaN for missing; ``categorical``: 26 hex strings
    (str or bytes), "" or None for missing; ``label``: optional 0/1.
    """
    if len(dense) != NUM_DENSE or len(categorical) != NUM_CATEGORICAL:
        raise ValueError(f"a raw row has {NUM_DENSE} dense and {NUM_CATEGORICAL} categorical values, "
                         f"got {len(dense)} and {len(categorical)}")
    feature = {}
    if label is not None:
        feature[LABEL_NAME] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    for name, x in zip(DENSE_NAMES, dense):
        if x is not None and not np.isnan(float(x)):
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(x)]))
    for name, value in zip(CATEGORICAL_NAMES, categorical):
        if value:
            data = value.encode() if isinstance(value, str) else bytes(value)
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    return tf.train.Example(features=tf.train.Features(feature=feature))
