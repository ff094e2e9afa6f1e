"""Models and optimizers: ``build_model`` by name, ``compile_model`` with the loss, metrics and step."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

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


def make_optimizer(name: str, lr) -> tf.keras.optimizers.legacy.Optimizer:
    """A tf_keras *legacy* optimizer: these apply ``IndexedSlices`` gradients as sparse
    row updates, where the new optimizers keep and rewrite full-table state.

    ``lr`` is a positive number or a ``LearningRateSchedule`` (evaluated at the optimizer's
    ``iterations``; the reference's warmup and decay: tfdlrm/training/schedule.py).
    Adagrad starts its accumulators at 0 with epsilon 1e-10, as ``torch.optim.Adagrad``
    in the reference DLRM.  Adam's moment slots are dense: every step decays the whole
    table's slots, so prefer SGD or Adagrad for large embeddings.
    """
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        pass
    elif not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"learning rate must be a positive number, got {lr}")
    legacy = tf.keras.optimizers.legacy
    if name == "sgd":
        return legacy.SGD(learning_rate=lr)
    if name == "adagrad":
        return legacy.Adagrad(learning_rate=lr, initial_accumulator_value=0.0, epsilon=1e-10)
    if name == "adam":
        return legacy.Adam(learning_rate=lr)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")


DEFAULT_LR = 0.1  # the learning rate of an optimizer given by name when no lr is given

OptimizerArg = Union[str, "tf.keras.optimizers.legacy.Optimizer", "tf.keras.optimizers.Optimizer"]

NEW_OPTIMIZER_WARNING = (
    "new (non-legacy) tf_keras optimizer {names}: the legacy ones (tf.keras.optimizers.legacy) "
    "update only the looked-up rows of the embedding tables, the new ones keep full-table slot state "
    "(docs/training.md); model.fit also runs Keras's stock step "
    "instead of the fast one (xla='sparse' needs legacy optimizers)"
)
_warned_new_optimizer = False  # the warning above is given once a process


def _new_optimizers(optimizer) -> list:
    """The new (non-legacy) tf_keras optimizers in ``optimizer``: itself, or inside a TFRS
    ``CompositeOptimizer``."""
    pairs = getattr(optimizer, "_optimizers_and_vars", None)
    if pairs:
        return [new for opt, _ in pairs for new in _new_optimizers(opt)]
    return [optimizer] if isinstance(optimizer, tf.keras.optimizers.Optimizer) else []


def _resolve_optimizer(value, lr: Optional[float], what: str, lr_flag: str):
    """``value``: a name (made with ``lr``, default 0.1) or a tf_keras optimizer object
    (returned as it is)."""
    if isinstance(value, str):
        return make_optimizer(value, DEFAULT_LR if lr is None else lr)
    if isinstance(value, (tf.keras.optimizers.legacy.Optimizer, tf.keras.optimizers.Optimizer)):
        if lr is not None:
            raise UserError(f"{what} is an optimizer object, which has its own learning rate: "
                            f"leave {lr_flag} out (got {lr_flag}={lr})")
        return value
    module = type(value).__module__ or ""
    if module.split(".")[0] == "keras":
        raise UserError(f"{what} is a Keras 3 optimizer ({module}.{type(value).__name__}); tfdlrm models are "
                        f"tf_keras (Keras 2) models: use tf.keras.optimizers.legacy (or tf.keras.optimizers) "
                        f"after `import tfdlrm`, not the keras package")
    raise UserError(f"{what} must be one of {', '.join(OPTIMIZER_NAMES)} or a tf_keras optimizer object, "
                    f"got {type(value).__name__} {value!r}")


def compile_model(model: tf.keras.Model, optimizer: OptimizerArg = "sgd", lr: Optional[float] = None,
                  embedding_optimizer: Optional[OptimizerArg] = None, embedding_lr: Optional[float] = None,
                  jit_compile: bool = False, metrics: bool = True, xla: str = "sparse") -> tf.keras.Model:
    """Compile with binary cross-entropy and (optionally) AUC / log loss / accuracy.

    ``optimizer`` is a name (``sgd``, ``adagrad``, ``adam``: a tf_keras *legacy* optimizer made by
    :func:`make_optimizer` with learning rate ``lr``, default 0.1, a number or a ``LearningRateSchedule``
    such as :class:`tfdlrm.training.schedule.LRPolicySchedule`) or a tf_keras optimizer object,
    used as it is (then ``lr`` must be left out: the object has its own).  Prefer the legacy
    optimizers (``tf.keras.optimizers.legacy.SGD``, ...): they update only the looked-up rows of
    a table.  A new tf_keras optimizer (``tf.keras.optimizers.SGD``, ...) is accepted with a
    warning (once a process): it keeps full-table state, and ``model.fit`` then runs Keras's
    stock step (``xla="sparse"`` becomes ``off``; ``full`` is refused).  Keras 3 optimizers
    (the ``keras`` package) are refused: the models are tf_keras models.

    With ``embedding_optimizer`` or ``embedding_lr`` the embedding tables
    (``model.embedding_variables``) get their own optimizer and the other weights
    (``model.dense_variables``) ``optimizer``, through TFRS's ``CompositeOptimizer``.
    ``embedding_optimizer`` is likewise a name or an object; it defaults to the same kind as
    ``optimizer`` when that is a name, ``embedding_lr`` to ``lr`` (0.1 when neither is given).

    ``xla`` picks the training step on one device (``tfdlrm.models.fast_step``): ``sparse`` (the
    default) compiles the embedding gathers and row updates with XLA, ``full`` the
    whole step (as ``jit_compile=True``), ``off`` is Keras's stock step.  Ids are
    range-checked in every case.  Parallel modes use their own steps.
    """
    global _warned_new_optimizer
    dense_opt = _resolve_optimizer(optimizer, lr, "optimizer", "lr")
    if embedding_optimizer is None and embedding_lr is None:
        opt = dense_opt
    else:
        import tensorflow_recommenders as tfrs

        if embedding_optimizer is None and not isinstance(optimizer, str):
            raise UserError("embedding_lr with an optimizer object: give embedding_optimizer too "
                            "(a name, or an optimizer object with its own learning rate)")
        if not isinstance(optimizer, str) and embedding_optimizer is optimizer:
            raise UserError("optimizer and embedding_optimizer are the same object: give the tables "
                            "an optimizer object of their own")
        if embedding_optimizer is None:
            embedding_optimizer = optimizer  # a name here
        if isinstance(embedding_optimizer, str) and embedding_lr is None:
            embedding_lr = lr
        sparse_opt = _resolve_optimizer(embedding_optimizer, embedding_lr, "embedding_optimizer", "embedding_lr")
        opt = tfrs.experimental.optimizers.CompositeOptimizer([
            (sparse_opt, lambda: model.embedding_variables),
            (dense_opt, lambda: model.dense_variables),
        ])
    new = _new_optimizers(opt)
    step = "full" if jit_compile else xla
    if new:
        if step == "full":
            raise UserError("xla='full' (jit_compile=True) compiles the optimizer update too, which needs a "
                            "legacy tf_keras optimizer (tf.keras.optimizers.legacy.SGD or Adagrad)")
        if step == "sparse":
            step = "off"  # the fast step creates and updates legacy optimizers' slots
        if not _warned_new_optimizer:
            _warned_new_optimizer = True
            names = ", ".join(type(o).__name__ for o in new)
            warnings.warn(NEW_OPTIMIZER_WARNING.format(names=names), UserWarning, stacklevel=2)
    keras_metrics = None
    if metrics:
        keras_metrics = [
            tf.keras.metrics.AUC(num_thresholds=1000, name="auc"),
            tf.keras.metrics.BinaryCrossentropy(name="logloss"),
            tf.keras.metrics.BinaryAccuracy(name="accuracy"),
        ]
    model.compile(optimizer=opt, loss=tf.keras.losses.BinaryCrossentropy(), metrics=keras_metrics)
    from tfdlrm.models.fast_step import use_fast_step

    use_fast_step(model, step)
    return model
