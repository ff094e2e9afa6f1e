"""Closed-form sizes of a model config: parameter counts and widths, without TensorFlow.

The layers' and models' own counts (``count_params``) are checked against these in
tests; the placement plan (tfdlrm/parallel/plan.py) uses them to budget devices.
"""
from __future__ import annotations

from typing import Sequence

from tfdlrm.presets import ModelConfig
from tfdlrm.tables import embedding_parameter_count


def mlp_parameter_count(fan_in: int, widths: Sequence[int]) -> int:
    """Weights plus biases of an MLP, in closed form."""
    total = 0
    for width in widths:
        total += fan_in * width + width
        fan_in = width
    return total


def dot_output_width(dim: int, num_features: int, self_interaction: bool = False) -> int:
    """Width of the dot interaction's output: the dense vector plus one value per pair."""
    n = num_features + 1
    pairs = n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2
    return dim + pairs


def interaction_output_width(kind: str, dense_width: int, dim: int, num_features: int,
                             self_interaction: bool = False) -> int:
    if kind == "dot":
        return dot_output_width(dim, num_features, self_interaction)
    return dense_width + num_features * dim


def dense_norm_parameter_count(config: ModelConfig) -> int:
    """The dense features' standardisation statistics (a mean and a variance per feature, not
    trained), where the config standardises them."""
    return 2 * config.num_dense if config.dense_norm == "standardize" else 0


def dlrm_parameter_count(config: ModelConfig) -> int:
    """Embedding tables (tfdlrm/tables.py) + bottom MLP + top MLP + the standardisation statistics."""
    width = interaction_output_width(config.interaction, config.bottom_mlp[-1], config.vector_dim,
                                     config.num_tables, config.self_interaction)
    return (embedding_parameter_count(config)
            + mlp_parameter_count(config.num_dense, config.bottom_mlp[1:])
            + mlp_parameter_count(width, config.top_mlp) + dense_norm_parameter_count(config))


def dcn_parameter_count(config: ModelConfig, cross: str = "v1") -> int:
    """Embeddings + cross layers + deep MLP + final logit + the standardisation statistics."""
    width = config.num_dense + config.num_tables * config.vector_dim
    if cross == "v1":
        cross_params = config.cross_layers * 2 * width
    elif config.cross_low_rank is None:
        cross_params = config.cross_layers * (width * width + width)
    else:
        cross_params = config.cross_layers * (2 * width * config.cross_low_rank + width)
    return (embedding_parameter_count(config) + cross_params
            + mlp_parameter_count(width, config.deep_mlp) + (width + config.deep_mlp[-1]) + 1
            + dense_norm_parameter_count(config))


def parameter_count(model: str, config: ModelConfig) -> int:
    """All parameters of ``model`` (dlrm, dcn, dcn-v2) built from ``config``."""
    if model == "dlrm":
        return dlrm_parameter_count(config)
    return dcn_parameter_count(config, "v1" if model == "dcn" else "v2")


def dense_parameter_count(config: ModelConfig, model: str = "dlrm") -> int:
    """Parameters outside the embedding tables."""
    return parameter_count(model, config) - embedding_parameter_count(config)
