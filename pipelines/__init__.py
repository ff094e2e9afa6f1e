"""Data for tfdlrm: generators (random, synthetic), Criteo conversion, tf.data readers.

Every source yields the same batch structure, so models never know where data came
from::

    ({"dense": float32 [batch, num_dense], "sparse": int64 [batch, tables]}, label float32 [batch, 1])

``sparse`` is ``[batch, tables, k]`` for fixed-size bags and ragged
``[batch, tables, None]`` for variable-size bags.
"""
import tfdlrm  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
