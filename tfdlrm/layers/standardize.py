"""Standardisation of the dense features by fixed statistics: ``(x - mean) / sqrt(variance + eps)``."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


class Standardize(tf.keras.layers.Layer):
    """Per-feature standardisation with statistics set once from the training data.

    The statistics are non-trainable weights (so checkpoints and SavedModels carry them)
    and start at mean 0, variance 1: until :meth:`set_statistics` the layer passes its
    input through.  Unlike batch normalisation the output of a row never depends on the
    rest of its batch, so a step split over devices equals the single-device step.
    (Keras's ``Normalization`` layer copies its statistics into tensors when adapted, so a
    checkpoint restored later would not reach them; here ``call`` reads the variables.)

    Args:
      epsilon: added to the variance (default 1e-6).

    Call args:
      x: float ``[batch, features]``.

    Returns:
      float32 ``[batch, features]``.
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        width = int(input_shape[-1])
        self.mean = self.add_weight(name="mean", shape=(width,), initializer="zeros", trainable=False)
        self.variance = self.add_weight(name="variance", shape=(width,), initializer="ones", trainable=False)
        super().build(input_shape)

    def set_statistics(self, mean, variance) -> None:
        """Use ``mean`` and ``variance`` (one value per feature) from now on."""
        mean, variance = np.asarray(mean, np.float32), np.asarray(variance, np.float32)
        if mean.shape != tuple(self.mean.shape) or variance.shape != tuple(self.variance.shape):
            raise ValueError(f"statistics of shape {mean.shape}/{variance.shape} for {self.mean.shape[0]} features")
        if not (np.isfinite(mean).all() and np.isfinite(variance).all() and (variance >= 0).all()):
            raise ValueError("statistics must be finite, variances non-negative")
        self.mean.assign(mean)
        self.variance.assign(variance)

    def call(self, x):
        x = tf.cast(x, tf.float32)
        return (x - self.mean) * tf.math.rsqrt(self.variance + self.epsilon)

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config
