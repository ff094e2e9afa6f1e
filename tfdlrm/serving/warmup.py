"""Warm-up requests written into an export's assets.extra, as TF Serving replays them on load."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfdlrm.serving.signatures import (
    SIGNATURE_EXAMPLES,
    SIGNATURE_IDS,
    SIGNATURE_RAW,
    SIGNATURE_TRANSFORM,
)

WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_BATCH_SIZES = (1, 16)


def sample_raw_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` made-up raw rows: float32 [n, 13] counts (some NaN), object [n, 26] hex (some "")."""
    from tfdlrm.pipelines.features import NUM_CATEGORICAL, NUM_DENSE

    rng = np.random.default_rng(seed)
    dense = np.floor(rng.exponential(20.0, (n, NUM_DENSE))).astype(np.float32)
    dense[rng.random((n, NUM_DENSE)) < 0.2] = np.nan
    values = rng.integers(0, 1 << 32, (n, NUM_CATEGORICAL), dtype=np.uint64)
    categorical = np.array([[f"{v:08x}" for v in row] for row in values], dtype=object)
    categorical[rng.random((n, NUM_CATEGORICAL)) < 0.15] = ""
    return dense, categorical


def sample_tabular(spec, n: int, seed: int = 0) -> dict:
    """``n`` made-up raw rows of a feature spec: ``{column: float32 or bytes [n]}`` (some missing)."""
    rng = np.random.default_rng(seed)
    out = {}
    for column in spec.dense:
        x = rng.exponential(10.0, n).astype(np.float32)
        x[rng.random(n) < 0.2] = np.nan
        out[column.name] = x
    for column in spec.categorical:
        tokens = [f"v{k}" for k in rng.integers(0, 20, 3 * n)]
        if column.multi_hot:
            values = [column.separator.join(tokens[3 * i:3 * i + int(rng.integers(0, 4))]) for i in range(n)]
        else:
            values = [t if rng.random() > 0.15 else "" for t in tokens[:n]]
        out[column.name] = np.array([v.encode() for v in values], dtype=object)
    return out


def sample_ids(config, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` made-up model inputs: float32 [n, num_dense] in [0, 1), int64 ids in range."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n, config.num_dense), dtype=np.float32)
    shape = (n, config.ids_per_lookup) if config.ids_per_lookup > 1 else (n,)
    sparse = np.stack([rng.integers(0, rows, shape) for rows in config.table_rows], axis=1).astype(np.int64)
    return dense, sparse


def warmup_requests(model_name: str, functions: dict, config, features=None) -> list:
    """PredictionLog protos for ``assets.extra/tf_serving_warmup_requests``: each signature
    at batch 1 and 16, with made-up rows (TF Serving runs each once when it loads).
    ``features``: the export's raw transform (Criteo's, your own features', or None)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from tfdlrm.pipelines.lookup import raw_example
    from tfdlrm.pipelines.spec import example as tabular_example

    logs = []
    for batch in WARMUP_BATCH_SIZES:
        dense, categorical = sample_raw_rows(batch, seed=batch)
        ids_dense, ids_sparse = sample_ids(config, batch, seed=batch)
        inputs = {}
        tabular = getattr(features, "spec", None)
        if tabular is not None:  # your own features: one named input per column
            raw = {name: tf.make_tensor_proto(values, tf.float32 if values.dtype == np.float32 else tf.string)
                   for name, values in sample_tabular(tabular, batch, seed=batch).items()}
            rows = [{k: (v[i].decode() if isinstance(v[i], bytes) else v[i]) for k, v in
                     sample_tabular(tabular, batch, seed=batch).items()} for i in range(batch)]
            serialized = [tabular_example(row, tabular).SerializeToString() for row in rows]
            inputs = {SIGNATURE_RAW: raw, SIGNATURE_TRANSFORM: raw,
                      SIGNATURE_EXAMPLES: {"examples": tf.make_tensor_proto(serialized, tf.string)}}
            ids_sparse = ids_sparse if not tabular.multi_hot else ids_sparse[:, :, None]
        elif SIGNATURE_TRANSFORM in functions:  # raw signatures exist
            raw = {"dense": tf.make_tensor_proto(dense, tf.float32),
                   "categorical": tf.make_tensor_proto(categorical.astype(bytes), tf.string)}
            serialized = [raw_example(d, c).SerializeToString() for d, c in zip(dense, categorical)]
            inputs = {SIGNATURE_RAW: raw, SIGNATURE_TRANSFORM: raw,
                      SIGNATURE_EXAMPLES: {"examples": tf.make_tensor_proto(serialized, tf.string)}}
        inputs[SIGNATURE_IDS] = {"dense": tf.make_tensor_proto(ids_dense, tf.float32),
                                 "sparse": tf.make_tensor_proto(ids_sparse, tf.int64)}
        for signature, tensors in inputs.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
            for key, proto in tensors.items():
                request.inputs[key].CopyFrom(proto)
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs
