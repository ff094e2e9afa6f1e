"""The raw -> ids mapping in TensorFlow, for serving graphs: lookups and tf.Example parsing."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import (
    CATEGORICAL_NAMES,
    DENSE_NAMES,
    LABEL_NAME,
    MISSING_ID,
    NUM_CATEGORICAL,
    NUM_DENSE,
    RARE_ID,
    dense_transform,
    parse_hex,
)
from tfdlrm.pipelines.vocabulary import CategoricalMapping


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
        from tfdlrm.pipelines.manifest import load_manifest

        manifest = load_manifest(dataset_dir)
        return cls(CategoricalMapping.load(dataset_dir, manifest["mapping"]), dataset_dir, on_invalid)

    def __call__(self, dense, categorical) -> dict:
        return {"dense": dense_transform(dense), "sparse": self.lookup(categorical)}


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
