"""DLRM's building blocks as tf_keras layers (one layer a file)."""
from tfdlrm.layers.embedding import EmbeddingTables
from tfdlrm.layers.interaction import CatInteraction, DotInteraction, make_interaction
from tfdlrm.layers.mlp import MLP

__all__ = ["EmbeddingTables", "MLP", "DotInteraction", "CatInteraction", "make_interaction"]
