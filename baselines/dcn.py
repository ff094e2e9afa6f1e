"""Deep & Cross Network (Wang et al., 2017), the DLRM paper's baseline, and DCN-v2.

    x0 = [dense [batch, num_dense], flattened embeddings [batch, tables * dim]]  [batch, D]
    cross network:  x_{l+1} = x0 * (x_l . w_l) + b_l + x_l,  l = 0..L-1           [batch, D]
    deep network:   MLP(x0) (512-256)                                            [batch, 256]
    logit = Dense(1)([x_L, deep])                                                [batch, 1]

The dense features are standardised by the training split's mean and variance first
(``config.dense_norm``, as DLRM's).
``cross="v1"`` is the original DCN; ``cross="v2"`` stacks ``tfrs.layers.dcn.Cross`` (low rank
with ``cross_low_rank``).  Both share DLRM's embedding layer (tfdlrm/layers/cross.py).
"""
from __future__ import annotations

import tensorflow as tf

from tfdlrm.layers.cross import CrossV1, CrossV2Stack
from tfdlrm.layers.mlp import MLP
from tfdlrm.models.base import RecommenderModel, compute_policy, make_dense_norm, make_sparse_arch
from tfdlrm.presets import CROSS_KINDS, ModelConfig
from tfdlrm.sizes import dcn_parameter_count


@tf.keras.utils.register_keras_serializable(package="tfdlrm")
class DCN(RecommenderModel):
    """Deep & Cross Network on DLRM's inputs; see the module docstring for shapes."""

    model_name = "dcn"

    def __init__(self, config: ModelConfig, cross: str = "v1", mixed_precision: str | None = None, **kwargs):
        if cross not in CROSS_KINDS:
            raise ValueError(f"cross must be one of {CROSS_KINDS}, got {cross!r}.")
        kwargs.setdefault("name", "dcn" if cross == "v1" else "dcn_v2")
        super().__init__(**kwargs)
        self.config = config.validated()
        self.cross = cross
        self.mixed_precision = mixed_precision
        self.sparse_arch = make_sparse_arch(config)
        # The dense features enter x0 standardised by the training split's statistics (set by
        # training.inputs.standardize_dense) unless config.dense_norm is "none": the cross layers
        # multiply by x0, so SGD's stable step shrinks with |x0|^2, and Criteo's log counts (all
        # positive, up to ~14) put lr 0.1 past it.  See docs/accuracy.md.
        self.dense_norm = make_dense_norm(config)
        if cross == "v1":
            self.cross_net = CrossV1(config.cross_layers, name="cross_net")
        else:
            self.cross_net = CrossV2Stack(config.cross_layers, config.cross_low_rank, name="cross_net")
        # Mixed precision applies to the deep network; the cross network (a residual sum
        # of products, cheap) and the logit stay float32.
        self.deep_net = MLP(config.deep_mlp, final_activation="relu", name="deep_net",
                            dtype=compute_policy(mixed_precision))
        self.logit_layer = tf.keras.layers.Dense(1, name="logit")

    def logits_from_embeddings(self, dense, embedded, training=None, compiled_parts=False):
        flat = tf.reshape(tf.cast(embedded, tf.float32), [-1, self.config.num_tables * self.config.vector_dim])
        x0 = tf.concat([self.normalized_dense(dense), flat], axis=1)  # [batch, D]
        crossed = self.cross_net(x0, compiled=True) if compiled_parts and self.cross == "v1" else self.cross_net(x0)
        joined = tf.concat([crossed, tf.cast(self.deep_net(x0), tf.float32)], axis=1)
        return self.logit_layer(joined)  # [batch, 1]

    def get_config(self):
        return {"config": self.config.to_dict(), "cross": self.cross, "name": self.name,
                "mixed_precision": self.mixed_precision}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(ModelConfig.from_dict(config["config"]), cross=config.get("cross", "v1"),
                   name=config.get("name"), mixed_precision=config.get("mixed_precision"))

    @staticmethod
    def parameter_count(config: ModelConfig, cross: str = "v1") -> int:
        """Closed-form count: embeddings + cross layers + deep MLP + final logit (tfdlrm/sizes.py)."""
        return dcn_parameter_count(config, cross)
