"""The models layer: DLRM and the parts every model shares (DCN is in baselines/dcn.py).

``batch`` is the batch contract, ``base`` the shared Keras model, ``dlrm`` the model,
``fast_step`` the one-device training step that ``model.fit`` runs.
"""
from tfdlrm.models.base import RecommenderModel, compute_policy, functional_view
from tfdlrm.models.batch import (
           FEATURE_KEYS,
           check_features,
           dummy_batch,
           feature_inputs,
)
from tfdlrm.models.dlrm import DLRM

__all__ = ["DLRM", "RecommenderModel", "compute_policy", "functional_view", "FEATURE_KEYS", "check_features",
           "dummy_batch", "feature_inputs"]
