"""Your own features: the feature spec (YAML or JSON) and its raw -> model transform.

A spec names the label, the dense columns and the categorical columns of a CSV or TSV
file with a header::

    label: clicked
    dense: [age, price]                  # log1p(max(x, 0)) as Criteo's; or {name: x, transform: none}
    categorical:
      - {name: country}                  # vocabulary of the training split (min_frequency)
      - {name: item, hash_buckets: 1000} # hashed into 1000 buckets
      - {name: tags, separator: "|"}     # multi-hot: a bag of ids, pooled (pooling: sum | mean)

:class:`TabularFeatures` is the transform, defined once: the converter
(``pipelines/tabular.py``) runs it eagerly on each chunk of rows, and the serving export
runs it in the graph on named request inputs, so both give the same ids.  Ids: 0 missing
(an empty value), 1 rare or unseen (vocabulary), 2.. the vocabulary in order of decreasing
count; hashed: 1 + fingerprint64(value) mod buckets.  A bag drops empty tokens and keeps
its first ``max_ids`` (the longest bag of the training split unless the spec says).
See docs/data.md, "Your own features".
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.pipelines.features import dense_transform, dense_transform_np
from tfdlrm.presets import POOLINGS

DENSE_TRANSFORMS = ("log1p", "none")
MISSING_ID = 0
RARE_ID = 1
# Names become serving input names and file names: letters, digits, _ (not first a digit).
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_BAG_IDS = 1024
_TOP_KEYS = ("label", "dense", "categorical", "pooling", "delimiter", "min_frequency")
_DENSE_KEYS = ("name", "transform")
_CATEGORICAL_KEYS = ("name", "hash_buckets", "min_frequency", "separator", "max_ids")


@dataclass(frozen=True)
class DenseColumn:
    name: str
    transform: str = "log1p"


@dataclass(frozen=True)
class CategoricalColumn:
    name: str
    hash_buckets: Optional[int] = None
    min_frequency: Optional[int] = None  # vocabulary mode; None: the spec's (default 1)
    separator: Optional[str] = None  # multi-hot when set
    max_ids: Optional[int] = None  # multi-hot: ids kept a bag (None: the training split's longest)

    @property
    def multi_hot(self) -> bool:
        return self.separator is not None

    @property
    def kind(self) -> str:
        return "hash" if self.hash_buckets is not None else "vocabulary"


@dataclass(frozen=True)
class FeatureSpec:
    """A parsed, checked feature spec.  ``columns``: every column it reads, label first."""

    label: str
    dense: tuple
    categorical: tuple
    pooling: str = "sum"
    delimiter: Optional[str] = None  # None: from the file name (.csv: comma; .tsv, .txt: tab)
    min_frequency: int = 1

    @property
    def columns(self) -> tuple:
        return (self.label, *(c.name for c in self.dense), *(c.name for c in self.categorical))

    @property
    def multi_hot(self) -> bool:
        return any(c.multi_hot for c in self.categorical)

    def to_dict(self) -> dict:
        return {"label": self.label, "dense": [asdict(c) for c in self.dense],
                "categorical": [asdict(c) for c in self.categorical], "pooling": self.pooling,
                "delimiter": self.delimiter, "min_frequency": self.min_frequency}

    @classmethod
    def from_dict(cls, data, where: str = "the feature spec") -> "FeatureSpec":
        """Check ``data`` (what YAML or JSON gave) and build the spec; every problem is a
        ``UserError`` naming the key."""
        if not isinstance(data, dict):
            raise UserError(f"{where} must be a mapping with label, dense and categorical; got {type(data).__name__}")
        _unknown(data, _TOP_KEYS, where)
        if "label" not in data:
            raise UserError(f"{where} has no label: name the 0/1 column (label: clicked)")
        label = _name(data["label"], f"{where}: label")
        dense = tuple(_dense(entry, f"{where}: dense[{i}]") for i, entry in enumerate(_list(data, "dense", where)))
        min_frequency = _positive(data.get("min_frequency", 1), f"{where}: min_frequency")
        categorical = tuple(_categorical(entry, f"{where}: categorical[{i}]")
                            for i, entry in enumerate(_list(data, "categorical", where)))
        if not dense:
            raise UserError(f"{where} has no dense columns: DLRM's bottom MLP needs at least one (dense: [x])")
        if not categorical:
            raise UserError(f"{where} has no categorical columns: DLRM needs at least one embedding table")
        pooling = data.get("pooling", "sum")
        if pooling not in POOLINGS:
            raise UserError(f"{where}: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        delimiter = data.get("delimiter")
        if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\""):
            raise UserError(f"{where}: delimiter must be one character (not a quote or line break), got {delimiter!r}")
        spec = cls(label, dense, categorical, pooling, delimiter, min_frequency)
        seen = set()
        for name in spec.columns:
            if name in seen:
                raise UserError(f"{where} names column {name!r} twice")
            seen.add(name)
        for column in categorical:
            if column.multi_hot and delimiter is not None and column.separator == delimiter:
                raise UserError(f"{where}: {column.name}'s separator is the file's delimiter {delimiter!r}")
        return spec

    @classmethod
    def load(cls, path: str) -> "FeatureSpec":
        """A spec file: YAML (``.yaml``, ``.yml``) or JSON (``.json``, or anything else that parses)."""
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as e:
            raise UserError(f"cannot read the feature spec {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UserError(f"the feature spec {path} is not text (UTF-8)") from None
        if file.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except ValueError as e:
                raise UserError(f"the feature spec {path} is not valid JSON: {e}") from None
        else:
            import yaml  # JSON is YAML too

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise UserError(f"the feature spec {path} is not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_dict(data, where=f"feature spec {path}")


def _unknown(data: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(allowed)})")


def _list(data: dict, key: str, where: str) -> list:
    value = data.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: {key} must be a list, got {type(value).__name__}")
    return value


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise UserError(f"{where}: column names must be letters, digits and _ (not starting with a digit, at most "
                        f"64), as serving inputs are named after them; got {value!r} (rename it in the header)")
    return value


def _positive(value, where: str, limit: int = 2**31 - 3) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise UserError(f"{where} must be a whole number from 1 to {limit:,}, got {value!r}")
    return value


def _dense(entry, where: str) -> DenseColumn:
    if isinstance(entry, str):
        return DenseColumn(_name(entry, where))
    if not isinstance(entry, dict) or "name" not in entry:
        raise UserError(f"{where} must be a column name or {{name: x, transform: log1p|none}}, got {entry!r}")
    _unknown(entry, _DENSE_KEYS, where)
    transform = entry.get("transform", "log1p")
    if transform not in DENSE_TRANSFORMS:
        raise UserError(f"{where}: transform must be one of {', '.join(DENSE_TRANSFORMS)}, got {transform!r}")
    return DenseColumn(_name(entry["name"], where), transform)


def _categorical(entry, where: str) -> CategoricalColumn:
    if isinstance(entry, str):
        return CategoricalColumn(_name(entry, where))
    if not isinstance(entry, dict) or "name" not in entry:
        raise UserError(f"{where} must be a column name or {{name: x, ...}}, got {entry!r}")
    _unknown(entry, _CATEGORICAL_KEYS, where)
    name = _name(entry["name"], where)
    buckets, threshold = entry.get("hash_buckets"), entry.get("min_frequency")
    if buckets is not None and threshold is not None:
        raise UserError(f"{where}: give hash_buckets or min_frequency, not both")
    if buckets is not None:
        _positive(buckets, f"{where}: hash_buckets", 2**31 - 2)
    if threshold is not None:
        _positive(threshold, f"{where}: min_frequency")
    separator, max_ids = entry.get("separator"), entry.get("max_ids")
    if separator is not None and (not isinstance(separator, str) or len(separator) != 1
                                  or separator in "\r\n\""):
        raise UserError(f"{where}: separator must be one character (not a quote or line break), got {separator!r}")
    if max_ids is not None:
        if separator is None:
            raise UserError(f"{where}: max_ids applies to multi-hot columns (give a separator)")
        _positive(max_ids, f"{where}: max_ids", MAX_BAG_IDS)
    return CategoricalColumn(name, buckets, threshold, separator, max_ids)


# -- the transform ---------------------------------------------------------------------------
def dense_np(x, transform: str):
    """Raw float32 values (NaN or +-inf = missing) -> the model's dense input (numpy)."""
    if transform == "log1p":
        return dense_transform_np(x)
    x = np.asarray(x, np.float32)
    return np.where(np.isfinite(x), x, np.float32(0)).astype(np.float32)


def vocabulary_path(dataset_dir, name: str) -> Path:
    return Path(dataset_dir) / "vocabulary" / f"{name}.txt"


class TabularFeatures(tf.Module):
    """The raw -> model transform of a converted dataset's feature spec.

    ``TabularFeatures(features, dataset_dir)``, with ``features`` the manifest's
    ``"features"`` entry, maps ``{column: [batch] values}`` (float32 for dense, string
    for categorical and multi-hot) to ``{"dense": float32 [batch, num_dense], "sparse":
    int64 [batch, tables]}``; ``sparse`` is ragged ``[batch, tables, None]`` when a
    column is multi-hot.  As a ``tf.Module``, an export tracks its
    vocabulary tables and their files become SavedModel assets.
    """

    def __init__(self, features: dict, dataset_dir: Optional[str] = None):
        super().__init__(name="tabular_features")
        self.spec = FeatureSpec.from_dict(features["spec"], where="the manifest's feature spec")
        self.columns = features["columns"]  # per categorical: kind, table_size, width, ...
        self.tables = []
        for column, info in zip(self.spec.categorical, self.columns):
            table = None
            if column.kind == "vocabulary" and info["vocabulary_size"] > 0:
                if dataset_dir is None:
                    raise ValueError("vocabulary lookups need the dataset directory (the vocabulary files)")
                init = tf.lookup.TextFileInitializer(
                    str(vocabulary_path(dataset_dir, column.name)), key_dtype=tf.string,
                    key_index=tf.lookup.TextFileIndex.WHOLE_LINE, value_dtype=tf.int64,
                    value_index=tf.lookup.TextFileIndex.LINE_NUMBER)
                table = tf.lookup.StaticHashTable(init, default_value=-1)
            self.tables.append(table)

    @property
    def input_names(self) -> tuple:
        return self.spec.columns[1:]

    def dense(self, columns: dict):
        """float32 [batch, num_dense] from the raw dense columns ([batch] float32, NaN = missing)."""
        out = []
        for column in self.spec.dense:
            x = tf.cast(tf.convert_to_tensor(columns[column.name]), tf.float32)
            if column.transform == "log1p":
                out.append(dense_transform(x))
            else:
                out.append(tf.where(tf.math.is_finite(x), x, tf.zeros_like(x)))
        return tf.stack(out, axis=1)

    def ids(self, index: int, values):
        """int64 ids of one categorical column's string values (any shape; "" = missing)."""
        column, table = self.spec.categorical[index], self.tables[index]
        values = tf.convert_to_tensor(values, tf.string)
        if column.kind == "hash":
            ids = 1 + tf.strings.to_hash_bucket_fast(values, column.hash_buckets)
        elif table is None:
            ids = tf.fill(tf.shape(values), tf.constant(RARE_ID, tf.int64))
        else:
            line = table.lookup(values)
            ids = tf.where(line >= 0, line + 2, tf.constant(RARE_ID, tf.int64))
        return tf.where(tf.equal(values, ""), tf.constant(MISSING_ID, tf.int64), ids)

    def tokens(self, index: int, values):
        """A multi-hot column's raw strings [batch] -> ragged tokens [batch, None] (empty tokens
        dropped), before truncation to the bag width."""
        column = self.spec.categorical[index]
        split = tf.strings.split(tf.convert_to_tensor(values, tf.string), sep=column.separator)
        return tf.ragged.boolean_mask(split, tf.strings.length(split) > 0)

    def bag(self, index: int, values):
        """A multi-hot column -> ragged ids [batch, None], at most the column's width a bag."""
        tokens = self.tokens(index, values)[:, :self.columns[index]["width"]]
        return tf.ragged.map_flat_values(lambda flat: self.ids(index, flat), tokens)

    def __call__(self, columns: dict) -> dict:
        dense = self.dense(columns)
        if not self.spec.multi_hot:
            sparse = tf.stack([self.ids(i, columns[c.name]) for i, c in enumerate(self.spec.categorical)], axis=1)
            return {"dense": dense, "sparse": sparse}
        bags = []
        for i, column in enumerate(self.spec.categorical):
            if column.multi_hot:
                bags.append(self.bag(i, columns[column.name]))
            else:
                bags.append(tf.RaggedTensor.from_tensor(self.ids(i, columns[column.name])[:, None]))
        return {"dense": dense, "sparse": tf.stack(bags, axis=1)}

    # -- tf.Example -----------------------------------------------------------------------
    def example_spec(self) -> dict:
        """The ``tf.io.parse_example`` spec: dense float_list, categorical bytes_list (ragged: absent = empty)."""
        spec = {c.name: tf.io.RaggedFeature(tf.float32) for c in self.spec.dense}
        spec.update({c.name: tf.io.RaggedFeature(tf.string) for c in self.spec.categorical})
        return spec

    def parse_examples(self, serialized) -> dict:
        """Serialized tf.Example protos [batch] -> the raw named inputs ([batch] each).

        Dense and single categorical features hold at most one value (absent: missing);
        a multi-hot feature holds the raw separated string or its tokens (joined)."""
        parsed = tf.io.parse_example(tf.convert_to_tensor(serialized, tf.string), self.example_spec())
        checks, out = [], {}
        for column in (*self.spec.dense, *self.spec.categorical):
            values = parsed[column.name]  # ragged [batch, None]
            if getattr(column, "multi_hot", False):
                out[column.name] = tf.strings.reduce_join(values, axis=1, separator=column.separator)
                continue
            checks.append(tf.debugging.Assert(
                tf.reduce_all(values.row_lengths() <= 1),
                [f"tfdlrm: tf.Example feature {column.name} must hold at most one value; an example has",
                 tf.reduce_max(values.row_lengths()), "values"]))
            default = float("nan") if isinstance(column, DenseColumn) else ""
            out[column.name] = values.to_tensor(default_value=default, shape=[None, 1])[:, 0]
        with tf.control_dependencies(checks):
            return {name: tf.identity(value) for name, value in out.items()}


def example(row: dict, spec: FeatureSpec) -> "tf.train.Example":
    """One raw row ``{column: value}`` as a ``tf.train.Example`` for the export's ``examples``
    signature (a client's helper): dense as float, categorical as bytes; None, NaN or ""
    (or the column absent) is missing."""
    import math

    feature = {}
    for column in spec.dense:
        x = row.get(column.name)
        if x is not None and x != "" and not math.isnan(float(x)):
            feature[column.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(x)]))
    for column in spec.categorical:
        value = row.get(column.name)
        if value:
            data = value.encode() if isinstance(value, str) else bytes(value)
            feature[column.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    return tf.train.Example(features=tf.train.Features(feature=feature))
