"""Models and optimizers: ``build_model`` by name, ``compile_model`` with the loss, metrics and step."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import MODEL_NAMES, OPTIMIZER_NAMES, ModelConfig


def build_model(name: str, config: ModelConfig, mixed_precision: Optional[str] = None) -> tf.keras.Model:
    """A built DLRM, DCN or DCN-v2 (variables created) for ``config``.

    ``mixed_precision="bf16"`` computes the MLPs in bfloat16 (variables, embedding
    tables included, stay float32, so checkpoints are the same either way).
    """
    if name == "dlrm":
        from tfdlrm.models.dlrm import DLRM

        model = DLRM(config, mixed_precision=mixed_precision)
    elif name in ("dcn", "dcn-v2"):
        from tfdlrm.baselines.dcn import DCN

        model = DCN(config, cross="v1" if name == "dcn" else "v2", mixed_precision=mixed_precision)
    else:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return model.build_from_config()


def make_optimizer(name: str, lr: float) -> tf.keras.optimizers.legacy.Optimizer:
    """A tf_keras *legacy* optimizer: these apply ``IndexedSlices`` gradients as sparse
    row updates, where the new optimizers keep and rewrite full-table state.

    Adagrad starts its accumulators at 0 with epsilon 1e-10, as ``torch.optim.Adagrad``
    in the reference DLRM.  Adam's moment slots are dense: every step decays the whole
    table's slots, so prefer SGD or Adagrad for large embeddings.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"learning rate must be a positive number, got {lr}")
    legacy = tf.keras.optimizers.legacy
    if name == "sgd":
        return legacy.SGD(learning_rate=lr)
    if name == "adagrad":
        return legacy.Adagrad(learning_rate=lr, initial_accumulator_value=0.0, epsilon=1e-10)
    if name == "adam":
        return legacy.Adam(learning_rate=lr)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")


def compile_model(model: tf.keras.Model, optimizer: str = "sgd", lr: float = 0.1,
                  embedding_optimizer: Optional[str] = None, embedding_lr: Optional[float] = None,
                  jit_compile: bool = False, metrics: bool = True, xla: str = "sparse") -> tf.keras.Model:
    """Compile with binary cross-entropy and (optionally) AUC / log loss / accuracy.

    With ``embedding_optimizer`` or ``embedding_lr`` the embedding tables get their own
    optimizer through TFRS's ``CompositeOptimizer``.

    ``xla`` picks the training step on one device (``tfdlrm.models.fast_step``): ``sparse`` (the
    default) compiles the embedding gathers and row updates with XLA, ``full`` the
    whole step (as ``jit_compile=True``), ``off`` is Keras's stock step.  Ids are
    range-checked in every case.  Parallel modes use their own steps.
    """
    dense_opt = make_optimizer(optimizer, lr)
    if embedding_optimizer is None and embedding_lr is None:
        opt = dense_opt
    else:
        import tensorflow_recommenders as tfrs

        sparse_opt = make_optimizer(embedding_optimizer or optimizer, embedding_lr or lr)
        opt = tfrs.experimental.optimizers.CompositeOptimizer([
            (sparse_opt, lambda: model.embedding_variables),
            (dense_opt, lambda: model.dense_variables),
        ])
    keras_metrics = None
    if metrics:
        keras_metrics = [
            tf.keras.metrics.AUC(num_thresholds=1000, name="auc"),
            tf.keras.metrics.BinaryCrossentropy(name="logloss"),
            tf.keras.metrics.BinaryAccuracy(name="accuracy"),
        ]
    model.compile(optimizer=opt, loss=tf.keras.losses.BinaryCrossentropy(), metrics=keras_metrics)
    from tfdlrm.models.fast_step import use_fast_step

    use_fast_step(model, "full" if jit_compile else xla)
    return model


def standardize_dense(model: tf.keras.Model, dataset: tf.data.Dataset, max_rows: int = 1_000_000) -> Optional[tuple]:
    """Set a model's dense-feature standardisation (DCN's ``dense_norm``) to the mean and
    variance of ``dataset``'s dense features (its first ``max_rows`` rows); returns them, or
    None for a model without one (DLRM: its bottom MLP takes the raw log counts, as the
    reference's does)."""
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
