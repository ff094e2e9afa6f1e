"""Exact held-out evaluation: every prediction gathered, then AUC, log loss, accuracy in numpy."""
from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.metrics import Evaluation, evaluate_predictions

HELD_OUT_CACHE_BYTES = 256 * 2**20  # held-out splits up to this size are kept in memory after their first pass


def in_memory_if_small(dataset: Optional[tf.data.Dataset], rows: int, config) -> Optional[tf.data.Dataset]:
    """``dataset`` (a held-out split, read in full at every evaluation), cached in memory after its first
    pass when its rows fit in :data:`HELD_OUT_CACHE_BYTES`: generated data is then not generated again,
    nor files read and parsed again, at each learning-curve point and epoch end."""
    if dataset is None:
        return None
    row_bytes = 4 * config.num_dense + 8 * config.num_tables * config.ids_per_lookup + 4
    return dataset.cache() if rows * row_bytes <= HELD_OUT_CACHE_BYTES else dataset


def curve_sample(source, batch_size: int, rows: int) -> tf.data.Dataset:
    """What each learning-curve point evaluates: the first ``rows`` of the validation split (the
    test split where there is none), in whole batches of ``batch_size``, kept in memory; ``rows``
    0: all of it.  Each point is exact on these rows; the epoch ends evaluate every row."""
    split = source.val_dataset(batch_size)
    split_rows = source.val_examples
    if split is None:
        split, split_rows = source.eval_dataset(batch_size), source.eval_examples
    if rows:
        split = split.take(-(-rows // batch_size))
        split_rows = min(split_rows, -(-rows // batch_size) * batch_size)
    return in_memory_if_small(split, split_rows, source.config)


_PREDICT_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def batch_predictor(model):
    """``features -> probabilities (numpy)`` for one batch, on this process.

    One device: a ``tf.function`` of the model's call, made once a model (``predict_on_batch``
    wraps each batch in a new one-element dataset first, which cost ~40 ms a learning-curve point).
    Under ParameterServerStrategy, ``predict_on_batch`` would dispatch to workers; the
    coordinator instead calls the model itself, reading the variables from the parameter
    servers.  Other strategies (mirrored, hybrid) keep ``predict_on_batch``.
    """
    strategy = model.distribute_strategy
    own_call = isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy) or (
        type(strategy) is type(tf.distribute.get_strategy()) and not tf.distribute.has_strategy()
        and getattr(model, "parallel_runner", None) is None)
    if not own_call:
        return lambda features: np.asarray(model.predict_on_batch(features))
    call = _PREDICT_FUNCTIONS.get(model)
    if call is None:
        call = tf.function(lambda features: model(features, training=False), reduce_retracing=True)
        _PREDICT_FUNCTIONS[model] = call
    return lambda features: np.asarray(call(features))


def predict_with_labels(model: tf.keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities over a whole ``(features, label)`` dataset."""

    predict = batch_predictor(model)
    labels, probabilities = [], []
    for features, y in dataset:
        probabilities.append(predict(features).reshape(-1))
        labels.append(y.numpy().reshape(-1))
    if not labels:
        raise UserError("the evaluation split is empty: nothing to evaluate")
    return np.concatenate(labels), np.concatenate(probabilities)


def evaluate(model: tf.keras.Model, dataset: tf.data.Dataset) -> Evaluation:
    """Exact AUC (rank-based), log loss and accuracy of ``model`` on ``dataset``."""
    return evaluate_predictions(*predict_with_labels(model, dataset))
