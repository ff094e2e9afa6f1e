"""The Criteo schema and the raw -> model transforms, defined once.

Columns (label, I1..I13, C1..C26), the dense transform (log1p of the clipped count) and
hex parsing, in TensorFlow and as numpy twins the converter uses (tests prove them equal).
See docs/data.md.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
LABEL_NAME = "label"
DENSE_NAMES = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
CATEGORICAL_NAMES = tuple(f"C{i}" for i in range(1, NUM_CATEGORICAL + 1))
FIELD_NAMES = (LABEL_NAME, *DENSE_NAMES, *CATEGORICAL_NAMES)
MISSING_ID = 0
RARE_ID = 1  # vocabulary mode: values seen fewer than T times, or never


# Ids are stored as int32; a table must stay below that.
MAX_TABLE_ROWS = 2**31 - 1
DENSE_FORMULA = "float32(log1p(max(float64(float32(x)), 0))); missing (empty, NaN, +-inf) -> 0"


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
