"""Cross networks for the DCN baseline: DCN v1 (a weight vector per layer) and DCN-v2 (TFRS ``Cross``)."""
from __future__ import annotations

import tensorflow as tf


class CrossV1(tf.keras.layers.Layer):
    """The original DCN cross network: ``num_layers`` layers of
    ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l`` with ``w_l, b_l`` of shape ``[D]``.

    Input ``x0 [batch, D]`` -> output ``[batch, D]``.

    ``w_l`` starts at normal(0, 1/D), ``b_l`` at 0.  Each layer multiplies by
    ``x0``, so the output is a degree-(L+1) polynomial of the inputs; with Criteo's
    log-count features (up to ~10) Glorot's sqrt(2/(D+1)) gave initial logits with a
    standard deviation near 2 and runs that hit NaN within 10 SGD steps at lr 0.1
    (tiny preset); 1/D keeps the initial logits near 0.4.
    """

    def __init__(self, num_layers: int = 6, **kwargs):
        super().__init__(**kwargs)
        if int(num_layers) < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}.")
        self.num_layers = int(num_layers)
        self._compiled = {}

    def build(self, input_shape):
        width = input_shape[-1]
        if width is None:
            raise ValueError(f"CrossV1 needs a known input width, got shape {input_shape}.")
        self.kernels = [
            self.add_weight(name=f"w_{i}", shape=(width, 1),
                            initializer=tf.keras.initializers.RandomNormal(stddev=1.0 / width))
            for i in range(self.num_layers)
        ]
        self.biases = [
            self.add_weight(name=f"b_{i}", shape=(width,), initializer="zeros")
            for i in range(self.num_layers)
        ]
        super().build(input_shape)

    def call(self, x0, compiled=False):
        """``compiled=True`` (the fast training step) runs the layers' elementwise products
        and sums, forward and backward, as a few XLA loops instead of dozens of
        TensorFlow ops over ``[batch, D]`` (DCN trained ~13% faster)."""
        if not compiled:
            return self._cross(x0)
        if "fn" not in self._compiled:
            self._compiled["fn"] = tf.function(self._cross, jit_compile=True, reduce_retracing=True)
        return self._compiled["fn"](x0)

    def _cross(self, x0):
        x = x0
        for w, b in zip(self.kernels, self.biases):
            x = x0 * tf.matmul(x, w) + b + x  # (x_l . w_l) is [batch, 1]
        return x

    def get_config(self):
        config = super().get_config()
        config.update(num_layers=self.num_layers)
        return config


class CrossV2Stack(tf.keras.layers.Layer):
    """``num_layers`` TFRS ``Cross`` layers (DCN-v2): ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``.

    Input ``x0 [batch, D]`` -> output ``[batch, D]``.
    """

    def __init__(self, num_layers: int = 6, low_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        import tensorflow_recommenders as tfrs

        self.num_layers = int(num_layers)
        self.low_rank = low_rank
        self.cross_layers = [
            tfrs.layers.dcn.Cross(projection_dim=low_rank, kernel_initializer="glorot_uniform",
                                  name=f"cross_{i}")
            for i in range(self.num_layers)
        ]

    def call(self, x0):
        x = x0
        for layer in self.cross_layers:
            x = layer(x0, x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(num_layers=self.num_layers, low_rank=self.low_rank)
        return config
