"""The DLRM model, built from named parts as TorchRec's ``dlrm.py``.

    dense  [batch, num_dense] --standardised (config.dense_norm)--DenseArch (bottom MLP)--> [batch, dim] --+
    sparse [batch, tables(, k)] --SparseArch (embeddings)--> [batch, tables, dim] -+
        --> InteractionArch --> [batch, interaction_width]
        --> OverArch (top MLP) --> logit [batch, 1] --> sigmoid --> probability
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tfdlrm.layers.interaction import make_interaction
from tfdlrm.layers.mlp import MLP
from tfdlrm.models.base import RecommenderModel, compute_policy, make_dense_norm, make_sparse_arch
from tfdlrm.presets import ModelConfig
from tfdlrm.sizes import dlrm_parameter_count


@tf.keras.utils.register_keras_serializable(package="tfdlrm")
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
        self.dense_norm = make_dense_norm(config)
        self.dense_arch = MLP(config.bottom_mlp[1:], final_activation="relu", name="dense_arch", dtype=policy)
        self.interaction_arch = make_interaction(
            config.interaction, self_interaction=config.self_interaction, name="interaction_arch", dtype=policy
        )
        # The logit layer computes in float32 whatever the policy (it is tiny).
        self.over_arch = MLP(config.top_mlp, final_activation=None, name="over_arch", dtype=policy,
                             float32_last=True)

    def logits_from_embeddings(self, dense, embedded, training=None, compiled_parts=False):
        bottom = self.dense_arch(self.normalized_dense(dense))  # [batch, dim]
        if self.config.interaction == "dot":
            interacted = self.interaction_arch(bottom, embedded, pick=self._triangle_pick(compiled_parts))
        else:
            interacted = self.interaction_arch(bottom, embedded)  # [batch, width]
        return tf.cast(self.over_arch(interacted), tf.float32)  # [batch, 1]

    def _triangle_pick(self, compiled_parts: bool):
        """How the dot interaction takes its triangle: in the fast training step, by its own small
        XLA functions (``compiled``), or by a plain gather when the whole step is compiled already
        (XLA's CPU matmuls are float32); elsewhere (prediction, export, the stock step) the
        layer's default."""
        if not compiled_parts:
            return None
        return "gather" if getattr(self.fast_step, "mode", None) == "full" else "compiled"

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name, "mixed_precision": self.mixed_precision}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(ModelConfig.from_dict(config["config"], "dlrm"), name=config.get("name", "dlrm"),
                   mixed_precision=config.get("mixed_precision"))

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        """Closed-form count: embedding rows * dim + bottom MLP + top MLP (tfdlrm/sizes.py)."""
        return dlrm_parameter_count(config)
