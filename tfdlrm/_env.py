"""Process set-up that must happen before TensorFlow is imported.

tensorflow-recommenders is written against Keras 2, so tfdlrm runs on tf_keras:
``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` resolve to ``tf_keras``.  That switch
is read when TensorFlow is imported (and when ``tf.keras`` is first touched), so
it has to be set before the first ``import tensorflow`` anywhere in the process.
A model that mixes Keras 3 layers into a tf_keras model fails silently (layers are
not tracked, weights never train), hence the hard error below.
"""
from __future__ import annotations

import os
import sys

KERAS_MISMATCH = (
    "tfdlrm needs Keras 2 (tf_keras), but TensorFlow was already imported with "
    "Keras 3 as tf.keras. Import tfdlrm before tensorflow, or set "
    "TF_USE_LEGACY_KERAS=1 in the environment before Python starts."
)


def _tensorflow_uses_keras3(tf_module) -> bool:
    """True when an already-imported TensorFlow routes tf.keras to Keras 3."""
    if not getattr(tf_module, "_tf_uses_legacy_keras", True):
        return True
    loader = tf_module.__dict__.get("keras")
    if loader is not None and getattr(loader, "_tfll_initialized", False):
        return getattr(loader, "_tfll_keras_version", None) == "keras_3"
    return False


def configure() -> None:
    """Set the environment for tf_keras, or fail if it is too late to do so."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    # TensorFlow's C++ INFO/WARNING lines drown the progress bars; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf_module = sys.modules.get("tensorflow")
    if tf_module is not None and _tensorflow_uses_keras3(tf_module):
        raise ImportError(KERAS_MISMATCH)
