"""Exact held-out evaluation: every prediction gathered, then AUC, log loss, accuracy in numpy."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.metrics import Evaluation, evaluate_predictions


def batch_predictor(model):
    """``features -> probabilities (numpy)`` for one batch, on this process.

    Under ParameterServerStrategy, ``predict_on_batch`` would dispatch to workers; the
    coordinator instead calls the model itself, reading the variables from the
    parameter servers.
    """
    import numpy as np
    import tensorflow as tf

    if isinstance(model.distribute_strategy, tf.distribute.experimental.ParameterServerStrategy):
        call = tf.function(lambda features: model(features, training=False))
        return lambda features: np.asarray(call(features))
    return lambda features: np.asarray(model.predict_on_batch(features))


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
