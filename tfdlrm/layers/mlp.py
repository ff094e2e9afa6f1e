"""DenseArch / OverArch: a Dense + ReLU stack with the reference DLRM's initialisation."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import tensorflow as tf


class MLP(tf.keras.layers.Layer):
    """A stack of Dense layers, one per entry of ``widths``.

    DLRM's DenseArch (the bottom MLP over the dense features) and OverArch (the top
    MLP over the interaction's output).

    Input ``[batch, fan_in]`` -> output ``[batch, widths[-1]]``.  Every layer but the
    last uses ``activation`` (ReLU); the last uses ``final_activation`` (ReLU by
    default, as the reference's bottom MLP; ``None`` for a logit).

    Initialisation as the reference DLRM: weights normal(0, sqrt(2 / (fan_in +
    fan_out))), biases normal(0, sqrt(1 / fan_out)).

    Mixed precision: with ``dtype="mixed_bfloat16"`` every layer computes in bfloat16
    (weights stay float32); ``float32_last=True`` keeps the last layer (a logit, say)
    in float32.  Variable names do not depend on the precision, so checkpoints load
    either way.

    Args:
      widths: Sequence of positive ints, the output width of each Dense layer, in
        order (non-empty); the layer's output width is ``widths[-1]``.
      activation: Optional string, the activation of every layer but the last
        (default ``"relu"``).
      final_activation: Optional string, the activation of the last layer (default
        ``"relu"``, as the reference's bottom MLP; ``None`` for a logit).
      float32_last: Boolean, whether the last layer computes in float32 whatever
        the layer's dtype policy (default ``False``).
      **kwargs: Passed to ``tf.keras.layers.Layer`` (``name``, ``dtype``, ...).

    Raises:
      ValueError: if ``widths`` is empty or has a non-positive entry; when built,
        if the input width is unknown.
    """

    def __init__(
        self,
        widths: Sequence[int],
        activation: Optional[str] = "relu",
        final_activation: Optional[str] = "relu",
        float32_last: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.float32_last = bool(float32_last)
        widths = [int(w) for w in widths]
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"MLP widths must be a non-empty list of positive ints, got {widths}.")
        self.widths = widths
        self.activation = activation
        self.final_activation = final_activation
        self.dense_layers: list[tf.keras.layers.Dense] = []

    def build(self, input_shape):
        fan_in = input_shape[-1]
        if fan_in is None:
            raise ValueError(f"MLP {self.name} needs a known input width, got shape {input_shape}.")
        self.dense_layers = []
        for i, width in enumerate(self.widths):
            last = i == len(self.widths) - 1
            layer = tf.keras.layers.Dense(
                width,
                activation=self.final_activation if last else self.activation,
                kernel_initializer=tf.keras.initializers.RandomNormal(
                    stddev=math.sqrt(2.0 / (fan_in + width))
                ),
                bias_initializer=tf.keras.initializers.RandomNormal(stddev=math.sqrt(1.0 / width)),
                name=f"dense_{i}",
                dtype="float32" if last and self.float32_last else self.dtype_policy,
            )
            layer.build(tf.TensorShape([None, fan_in]))
            self.dense_layers.append(layer)
            fan_in = width
        super().build(input_shape)

    def call(self, x):
        """Runs the Dense layers in order.

        Args:
          x: ``[batch, fan_in]`` tensor (``fan_in`` known when the layer is built).

        Returns:
          ``[batch, widths[-1]]`` tensor, in the layer's compute dtype (float32 with
          ``float32_last=True``).
        """
        for layer in self.dense_layers:
            x = layer(x)
        return x

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[:-1]).concatenate([self.widths[-1]])

    def get_config(self):
        config = super().get_config()
        config.update(
            widths=list(self.widths),
            activation=self.activation,
            final_activation=self.final_activation,
            float32_last=self.float32_last,
        )
        return config
