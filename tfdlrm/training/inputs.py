"""What a model's inputs are: the dense features' standardisation, set from the training split
(``--dense-norm``), and the description of the inputs a run records (metrics.json, compare's report)
so that a reader sees whether runs saw the same inputs."""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import ModelConfig

# What generated data's dense features are (pipelines/generators.py)
GENERATED_DENSE = {"synthetic": "generated, log-count scale", "random": "generated, uniform or normal"}


def standardize_dense(model: tf.keras.Model, dataset: tf.data.Dataset, max_rows: int = 1_000_000) -> Optional[tuple]:
    """Set a model's dense-feature standardisation (``dense_norm``) to the mean and variance of
    ``dataset``'s dense features (its first ``max_rows`` rows); returns them, or None for a model
    without one (``dense_norm="none"``: its first layer takes the values as they are, as the
    reference's bottom MLP takes the raw log counts)."""
    layer = getattr(model, "dense_norm", None)
    if layer is None:
        return None
    total, total_sq, rows = 0.0, 0.0, 0
    for features, _ in dataset:
        dense = np.asarray(features["dense"], np.float64)
        total, total_sq, rows = total + dense.sum(0), total_sq + (dense * dense).sum(0), rows + len(dense)
        if rows >= max_rows:
            break
    if rows == 0:
        raise UserError("the training split is empty: no statistics for the dense features")
    mean = total / rows
    variance = np.maximum(total_sq / rows - mean * mean, 0.0)
    layer.set_statistics(mean, variance)
    return mean, variance


def describe_inputs(config: ModelConfig, data: dict) -> dict:
    """The inputs a model of ``config`` trains on from the data ``data`` describes
    (``DataSource.describe()``): ``dense_transform`` (raw values to the model's dense features),
    ``dense_norm`` (what the model does to them first) and ``vocabulary`` (how categorical values
    became ids)."""
    kind = data.get("kind")
    mapping = data.get("mapping") or {}
    if kind in GENERATED_DENSE:
        transform, vocabulary = GENERATED_DENSE[kind], "generated ids"
    else:
        transform = "per feature, as the dataset's feature spec says" if data.get("features") else (
            mapping.get("dense") or "as converted")
        if mapping.get("categorical") == "hash":
            vocabulary = f"hashing into {mapping.get('hash_buckets'):,} buckets"
        elif mapping.get("categorical") == "vocabulary":
            vocabulary = f"vocabulary of values seen >= {mapping.get('min_frequency')} times"
        else:
            vocabulary = str(mapping.get("categorical", "as converted"))
    norm = {"standardize": "standardised (training split's mean and variance)",
            "none": "none (as transformed)"}[config.dense_norm]
    rows = list(config.table_rows)
    return {"dense_transform": transform, "dense_norm": config.dense_norm, "dense_norm_text": norm,
            "vocabulary": vocabulary, "tables": len(rows), "table_rows": sum(rows)}
