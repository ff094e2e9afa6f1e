"""What DLRM and DCN share: the embedding lookup, the train step dispatch, the dtype policy.

A model subclasses :class:`RecommenderModel` and implements ``logits_from_embeddings``.
See docs/training.md for the Python API.
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tfdlrm.layers.embedding import EmbeddingTables
from tfdlrm.layers.standardize import Standardize
from tfdlrm.models.batch import check_features, dummy_batch, feature_inputs
from tfdlrm.presets import ModelConfig
from tfdlrm.tables import table_options


def make_sparse_arch(config: ModelConfig) -> EmbeddingTables:
    return EmbeddingTables(config.table_rows, config.embedding_dim, pooling=config.pooling, name="sparse_arch",
                           **table_options(config))


def make_dense_norm(config: ModelConfig) -> Optional[Standardize]:
    """The dense features' standardisation (statistics set from the training split by
    ``training.inputs.standardize_dense``), or None where ``config.dense_norm`` is ``none``."""
    return Standardize(name="dense_norm") if config.dense_norm == "standardize" else None


def compute_policy(mixed_precision: Optional[str]) -> str:
    """The Keras dtype policy of a model's dense parts: ``mixed_bfloat16`` for ``bf16``
    (bfloat16 maths, float32 weights), else ``float32``.  Embedding tables are always
    float32 (their layer keeps the float32 policy)."""
    if mixed_precision not in (None, "bf16"):  # resolved values (fast_step.resolve_mixed_precision)
        raise ValueError(f"mixed_precision must be None or 'bf16', got {mixed_precision!r}.")
    return "mixed_bfloat16" if mixed_precision == "bf16" else "float32"


class RecommenderModel(tf.keras.Model):
    """What DLRM and DCN share: embeddings (``sparse_arch``) looked up from the ids,
    then :meth:`logits_from_embeddings` on the dense features and the looked-up vectors.

    ``model.fit`` runs :meth:`train_step`; a parallel mode set by ``tfdlrm.parallel``
    (``parallel_runner``) replaces it, with the same loss and metrics; on one device,
    ``fast_step`` (``tfdlrm.models.fast_step``, set by ``compile_model``) runs it with compiled
    embedding gathers and updates.

    ``mixed_precision="bf16"`` computes the dense parts in bfloat16 (weights and
    embedding tables stay float32; logits are float32).
    """

    parallel_runner = None  # set by tfdlrm.parallel: hybrid placement or exact mirrored loss
    fast_step = None  # set by tfdlrm.models.fast_step.use_fast_step (compile_model does)
    mixed_precision: Optional[str] = None

    @property
    def embedding_variables(self) -> list:
        """The embedding tables' row variables (``sparse_arch.tables``), as TFRS's ``Ranking`` splits
        them: what is gathered by id and updated row by row."""
        return [part for table in self.sparse_arch.tables
                for part in (table.variables if getattr(table, "is_sharded_variable", False) else [table])]

    @property
    def dense_variables(self) -> list:
        """Every other trainable variable: MLPs, interaction, cross network, logit layer, mixed-dimension
        tables' projections."""
        tables = {v.ref() for v in self.embedding_variables}
        return [v for v in self.trainable_variables if v.ref() not in tables]

    def normalized_dense(self, dense):
        """The dense features as the first layer sees them (float32): standardised by ``dense_norm``
        (``make_dense_norm``), or as given where ``config.dense_norm`` is ``none``."""
        return self.dense_norm(dense) if self.dense_norm is not None else tf.cast(dense, tf.float32)

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
        step compiled (``tfdlrm.models.fast_step``, ``xla="full"``), which checks ids before the
        compiled part: a step Keras compiled whole could not raise on a bad id."""
        super().compile(*args, jit_compile=False, **kwargs)
        if jit_compile:
            from tfdlrm.models.fast_step import use_fast_step

            use_fast_step(self, "full")

    def get_compile_config(self):
        """None: a ``.keras`` file holds no compile state, so a loaded model is compiled again
        (``compile_model``).  What ``compile_model`` sets up cannot be written as a config (the
        fast step; TFRS's ``CompositeOptimizer``, whose ``get_config`` raises), and Keras never
        calls a custom ``compile`` on loading anyway."""
        return None

    def test_step(self, data):
        if self.parallel_runner is not None:
            return self.parallel_runner.test_step(self, data)
        return super().test_step(data)

    def build_from_config(self, build_config=None):
        """Create all variables by calling the model once on a dummy batch (Keras calls it
        with its build config when loading a ``.keras`` file; the model config says all)."""
        self(dummy_batch(self.config))
        return self

    def summary(self, *args, **kwargs):
        """Keras summary of a functional view: named inputs and per-part output shapes."""
        functional_view(self).summary(*args, **kwargs)


def functional_view(model: tf.keras.Model) -> tf.keras.Model:
    """The model's parts wired as a functional model: same layers, same weights."""
    inputs = feature_inputs(model.config)
    output = tf.keras.activations.sigmoid(model.logits(inputs))
    return tf.keras.Model(inputs, output, name=model.name)
