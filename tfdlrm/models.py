"""The DLRM model, built from named parts as TorchRec's ``dlrm.py``.

    dense  [batch, num_dense] --DenseArch (bottom MLP)--> [batch, dim] ----------+
    sparse [batch, tables(, k)] --SparseArch (embeddings)--> [batch, tables, dim] -+
        --> InteractionArch --> [batch, interaction_width]
        --> OverArch (top MLP) --> logit [batch, 1] --> sigmoid --> probability
"""
from __future__ import annotations

from typing import Mapping, Optional

import tensorflow as tf

from tfdlrm.layers.embedding import EmbeddingTables
from tfdlrm.layers.interaction import interaction_output_width, make_interaction
from tfdlrm.layers.mlp import MLP, mlp_parameter_count
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


def make_sparse_arch(config: ModelConfig) -> EmbeddingTables:
    return EmbeddingTables(config.table_rows, config.embedding_dim, pooling=config.pooling, name="sparse_arch")


MIXED_PRECISIONS = (None, "bf16")


def compute_policy(mixed_precision: Optional[str]) -> str:
    """The Keras dtype policy of a model's dense parts: ``mixed_bfloat16`` for ``bf16``
    (bfloat16 maths, float32 weights), else ``float32``.  Embedding tables are always
    float32 (their layer keeps the float32 policy)."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be None or 'bf16', got {mixed_precision!r}.")
    return "mixed_bfloat16" if mixed_precision == "bf16" else "float32"


class RecommenderModel(tf.keras.Model):
    """What DLRM and DCN share: embeddings (``sparse_arch``) looked up from the ids,
    then :meth:`logits_from_embeddings` on the dense features and the looked-up vectors.

    ``model.fit`` runs :meth:`train_step`; a parallel mode set by ``tfdlrm.parallel``
    (``parallel_runner``) replaces it, with the same loss and metrics; on one device,
    ``fast_step`` (``tfdlrm.fast``, set by ``compile_model``) runs it with compiled
    embedding gathers and updates.

    ``mixed_precision="bf16"`` computes the dense parts in bfloat16 (weights and
    embedding tables stay float32; logits are float32).
    """

    parallel_runner = None  # set by tfdlrm.parallel: hybrid placement or exact mirrored loss
    fast_step = None  # set by tfdlrm.fast.use_fast_step (compile_model does)
    mixed_precision: Optional[str] = None

    def logits_from_embeddings(self, dense, embedded, training=None, compiled_parts=False):
        """``dense [batch, num_dense]`` and ``embedded [batch, tables, dim]`` -> logit ``[batch, 1]``.

        ``compiled_parts=True`` (the fast training step on one device) lets parts that
        gain from XLA compile themselves (DCN's cross network)."""
        raise NotImplementedError

    def logits(self, inputs, training=None):
        dense, sparse = check_features(inputs, self.config, type(self).__name__)
        embedded = self.sparse_arch(sparse)  # [batch, tables, dim]
        return self.logits_from_embeddings(dense, embedded, training=training)

    def call(self, inputs, training=None):
        # tf.keras.activations.sigmoid remembers the logit, so binary cross-entropy
        # on the probability is computed from the logit (no clipping at 1e-7).
        return tf.keras.activations.sigmoid(self.logits(inputs, training=training))

    def train_step(self, data):
        if self.parallel_runner is not None:
            return self.parallel_runner.train_step(self, data)
        if self.fast_step is not None:
            metrics = self.fast_step.train_step(self, data)
            if metrics is not None:
                return metrics
        return super().train_step(data)

    def compile(self, *args, jit_compile=None, **kwargs):
        """Keras's ``compile``; ``jit_compile=True`` selects the fast step with the whole
        step compiled (``tfdlrm.fast``, ``xla="full"``), which checks ids before the
        compiled part: a step Keras compiled whole could not raise on a bad id."""
        super().compile(*args, jit_compile=False, **kwargs)
        if jit_compile:
            from tfdlrm.fast import use_fast_step

            use_fast_step(self, "full")

    def test_step(self, data):
        if self.parallel_runner is not None:
            return self.parallel_runner.test_step(self, data)
        return super().test_step(data)

    def build_from_config(self):
        """Create all variables by calling the model once on a dummy batch."""
        self(dummy_batch(self.config))
        return self

    def summary(self, *args, **kwargs):
        """Keras summary of a functional view: named inputs and per-part output shapes."""
        functional_view(self).summary(*args, **kwargs)


class DLRM(RecommenderModel):
    """Deep Learning Recommendation Model (Naumov et al., 2019).

    Call on ``{"dense": float32 [batch, num_dense], "sparse": int [batch, tables]}``
    (or ``[batch, tables, k]`` / ragged ``[batch, tables, None]`` bags) and get the
    click probability ``[batch, 1]``; :meth:`logits` gives the logit before the
    sigmoid.
    """

    model_name = "dlrm"

    def __init__(self, config: ModelConfig, mixed_precision: Optional[str] = None, **kwargs):
        kwargs.setdefault("name", "dlrm")
        super().__init__(**kwargs)
        self.config = config.validated()
        self.mixed_precision = mixed_precision
        policy = compute_policy(mixed_precision)
        self.sparse_arch = make_sparse_arch(config)
        self.dense_arch = MLP(config.bottom_mlp[1:], final_activation="relu", name="dense_arch", dtype=policy)
        self.interaction_arch = make_interaction(
            config.interaction, self_interaction=config.self_interaction, name="interaction_arch", dtype=policy
        )
        # The logit layer computes in float32 whatever the policy (it is tiny).
        self.over_arch = MLP(config.top_mlp, final_activation=None, name="over_arch", dtype=policy,
                             float32_last=True)

    def logits_from_embeddings(self, dense, embedded, training=None, compiled_parts=False):
        bottom = self.dense_arch(dense)  # [batch, dim]
        interacted = self.interaction_arch(bottom, embedded)  # [batch, width]
        return tf.cast(self.over_arch(interacted), tf.float32)  # [batch, 1]

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name, "mixed_precision": self.mixed_precision}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(ModelConfig.from_dict(config["config"]), name=config.get("name", "dlrm"),
                   mixed_precision=config.get("mixed_precision"))

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        """Closed-form count: embedding rows * dim + bottom MLP + top MLP."""
        width = interaction_output_width(
            config.interaction, config.bottom_mlp[-1], config.embedding_dim, config.num_tables,
            config.self_interaction,
        )
        return (
            sum(config.table_rows) * config.embedding_dim
            + mlp_parameter_count(config.num_dense, config.bottom_mlp[1:])
            + mlp_parameter_count(width, config.top_mlp)
        )


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


def functional_view(model: tf.keras.Model) -> tf.keras.Model:
    """The model's parts wired as a functional model: same layers, same weights."""
    inputs = feature_inputs(model.config)
    output = tf.keras.activations.sigmoid(model.logits(inputs))
    return tf.keras.Model(inputs, output, name=model.name)
