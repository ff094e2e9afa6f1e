"""The batch contract every model and data source shares (as TorchRec's ``Batch``).

A batch is ``({"dense": float32 [batch, num_dense], "sparse": int [batch, tables]}, label [batch, 1])``;
``sparse`` is ``[batch, tables, k]`` for fixed bags and ragged ``[batch, tables, None]`` for
variable ones.  ``check_features`` validates it, ``feature_inputs`` gives Keras inputs for it.
"""
from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from tfdlrm.presets import ModelConfig

FEATURE_KEYS = ("dense", "sparse")


def check_features(inputs, config: ModelConfig, model_name: str):
    """Validate and unpack ``{"dense": [batch, num_dense], "sparse": ids}``."""
    if not isinstance(inputs, Mapping) or set(FEATURE_KEYS) - set(inputs):
        got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise ValueError(
            f"{model_name} expects a dict {{'dense': float32 [batch, {config.num_dense}], "
            f"'sparse': int [batch, {config.num_tables}]}}; got {got}."
        )
    dense, sparse = inputs["dense"], inputs["sparse"]
    if not hasattr(dense, "shape"):
        dense = tf.convert_to_tensor(dense, tf.float32)
    if not hasattr(sparse, "shape"):
        sparse = tf.convert_to_tensor(sparse)
    dense_shape, sparse_shape = tf.TensorShape(dense.shape), tf.TensorShape(sparse.shape)
    if dense_shape.rank != 2 or dense_shape[-1] != config.num_dense:
        raise ValueError(
            f"{model_name} expects dense features of shape [batch, {config.num_dense}], got {dense.shape}."
        )
    if tf.as_dtype(dense.dtype) != tf.float32:
        dense = tf.cast(dense, tf.float32)
    if sparse_shape.rank is not None and sparse_shape.rank >= 2 and sparse_shape[1] not in (None, config.num_tables):
        raise ValueError(
            f"{model_name} expects ids for {config.num_tables} categorical features, got {sparse.shape[1]} "
            f"(sparse shape {sparse.shape})."
        )
    return dense, sparse


def feature_inputs(config: ModelConfig) -> dict:
    """Keras ``Input`` placeholders for a config's features (one-hot, bags or ragged)."""
    dense = tf.keras.Input(shape=(config.num_dense,), dtype=tf.float32, name="dense")
    if config.ids_per_lookup == 1:
        sparse = tf.keras.Input(shape=(config.num_tables,), dtype=tf.int64, name="sparse")
    else:
        sparse = tf.keras.Input(shape=(config.num_tables, config.ids_per_lookup), dtype=tf.int64, name="sparse")
    return {"dense": dense, "sparse": sparse}


def dummy_batch(config: ModelConfig, batch: int = 2) -> dict:
    """A valid batch of zeros, for building variables."""
    shape = [batch, config.num_tables] + ([config.ids_per_lookup] if config.ids_per_lookup > 1 else [])
    return {"dense": tf.zeros([batch, config.num_dense]), "sparse": tf.zeros(shape, tf.int64)}
