"""The MLP-only floor of a DLRM training step: its bottom and top MLPs alone, timed in the process
that times the step, so that ``bench train`` can say how far the whole step is from its matmuls.

A step of the floor is the two MLPs' forward pass (no biases, ReLU between layers, the top MLP's
input a fixed stand-in for the interaction's output), a logistic loss, the backward pass and a
plain SGD update of every weight: no embeddings, no interaction, no Keras.  It runs ``per_call``
steps a call of one ``tf.function``, as ``train`` runs its steps, in the step's precision and
on TensorFlow's pools as the process has them.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from tfdlrm.sizes import interaction_output_width


def mlp_widths(config) -> tuple[list, list]:
    """The bottom MLP's widths (input first) and the top MLP's (its input, the interaction's
    width, first), as DLRM builds them."""
    bottom = [int(w) for w in config.bottom_mlp]
    top_in = interaction_output_width(config.interaction, bottom[-1], config.embedding_dim, config.num_tables,
                                      config.self_interaction)
    return bottom, [top_in, *[int(w) for w in config.top_mlp]]


def mlp_floor(config, batch_size: int, per_call: int = 1, calls: int = 20, repeats: int = 5,
              bf16: bool = False) -> dict:
    """Milliseconds a step of the floor (median of ``repeats`` runs of ``calls`` calls), with the
    widths and precision it ran."""
    import tensorflow as tf

    bottom, top = mlp_widths(config)
    rng = np.random.default_rng(0)

    def weights(widths):
        return [tf.Variable(rng.normal(0.0, np.sqrt(2.0 / (a + b)), (a, b)).astype(np.float32))
                for a, b in zip(widths[:-1], widths[1:])]

    bottom_w, top_w = weights(bottom), weights(top)
    variables = bottom_w + top_w
    compute = tf.bfloat16 if bf16 else tf.float32
    dense = tf.constant(np.abs(rng.normal(size=(batch_size, bottom[0]))).astype(np.float32))
    interaction = tf.constant(rng.normal(size=(batch_size, top[0] - bottom[-1])).astype(np.float32))
    labels = tf.constant((rng.random((batch_size, 1)) < 0.25).astype(np.float32))

    def forward(ws, h, relu_last):
        for i, w in enumerate(ws):
            h = tf.matmul(h, tf.cast(w, compute))
            if i < len(ws) - 1 or relu_last:
                h = tf.nn.relu(h)
        return h

    def one_step():
        with tf.GradientTape() as tape:
            below = forward(bottom_w, tf.cast(dense, compute), True)
            logits = forward(top_w, tf.concat([below, tf.cast(interaction, compute)], axis=1), False)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32)))
        for w, g in zip(variables, tape.gradient(loss, variables)):
            w.assign_sub(1e-4 * g)
        return loss

    @tf.function(autograph=False)
    def call():
        return tf.foldl(lambda total, _: total + one_step(), tf.range(per_call), initializer=tf.constant(0.0))

    for _ in range(3):  # tracing, oneDNN's first calls
        call().numpy()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            total = call()
        total.numpy()
        runs.append((time.perf_counter() - start) / (calls * per_call))
    return {"ms_per_step": round(statistics.median(runs) * 1000, 3),
            "runs_ms_per_step": [round(r * 1000, 3) for r in runs],
            "bottom_mlp": "-".join(map(str, bottom)), "top_mlp": "-".join(map(str, top)),
            "precision": "bf16" if bf16 else "float32", "steps_a_call": per_call,
            "what": "bottom and top MLPs alone: forward, logistic loss, backward, SGD update; no biases, "
                    "embeddings or interaction"}
