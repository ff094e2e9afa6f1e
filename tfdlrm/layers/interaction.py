"""InteractionArch: how the dense vector and the embedding vectors are combined."""
from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from tfdlrm.presets import INTERACTIONS


def dot_pair_indices(num_vectors: int, self_interaction: bool = False) -> np.ndarray:
    """Flat indices into a ``[n, n]`` Gram matrix of its lower triangle, row-major.

    Pairs ``(i, j)`` with ``j < i`` (``j <= i`` with self-interaction), the order of
    the reference DLRM's ``li, lj`` and of TFRS's ``DotInteraction``.
    """
    offset = 1 if self_interaction else 0
    return np.array(
        [i * num_vectors + j for i in range(num_vectors) for j in range(i + offset)],
        dtype=np.int32,
    )


@functools.lru_cache(maxsize=16)
def selection_matrix(num_vectors: int, self_interaction: bool = False) -> np.ndarray:
    """``[n * n, pairs]`` 0/1 float32: column ``p`` picks the ``p``-th entry of
    :func:`dot_pair_indices` from a flattened Gram matrix."""
    index = dot_pair_indices(num_vectors, self_interaction)
    matrix = np.zeros([num_vectors * num_vectors, len(index)], np.float32)
    matrix[index, np.arange(len(index))] = 1.0
    return matrix


@functools.lru_cache(maxsize=16)
def symmetric_spread_indices(num_vectors: int, self_interaction: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Where each entry of a flattened ``[n, n]`` matrix finds its pair's gradient: ``(index,
    scale)``, ``index`` ``[n * n]`` int32 into the pairs padded with one zero (entry ``(i, j)``
    and ``(j, i)`` both read pair ``p`` of :func:`dot_pair_indices`, the rest read the zero), and
    ``scale`` ``[n * n]`` float32 (2 on a self pair's diagonal entry, since d(v.v)/dv = 2v, else 1).

    With ``G`` so built, the gradient of every pair's dot product with respect to the vectors
    ``V`` is ``G @ V``: one batched matmul instead of two and their transposes."""
    pairs = dot_pair_indices(num_vectors, self_interaction)
    index = np.full(num_vectors * num_vectors, len(pairs), np.int32)
    scale = np.ones(num_vectors * num_vectors, np.float32)
    for p, flat in enumerate(pairs):
        i, j = divmod(int(flat), num_vectors)
        index[i * num_vectors + j] = index[j * num_vectors + i] = p
        if i == j:
            scale[flat] = 2.0
    return index, scale


@functools.lru_cache(maxsize=16)
def compiled_triangle(num_vectors: int, dim: int, self_interaction: bool = False):
    """``(take, spread)``, two small XLA-compiled functions of the dot interaction's triangle.

    ``take(dense, gram)``: ``[batch, dim]`` and the Gram matrix ``[batch, n, n]`` -> the layer's
    output ``[batch, dim + pairs]`` (the dense vector, then the triangle).  ``spread(grad)``: the
    output's gradient -> the symmetric ``[batch, n, n]`` matrix ``G`` of
    :func:`symmetric_spread_indices`.  XLA's gather with constant indices along the minor axis
    copies 7x faster than TensorFlow's ``GatherV2`` (0.5 against 3.6 ms at batch 2048), and its
    gradient is a gather too rather than TensorFlow's ``UnsortedSegmentSum``."""
    index = dot_pair_indices(num_vectors, self_interaction)
    spread_index, scale = symmetric_spread_indices(num_vectors, self_interaction)
    n = num_vectors

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def take(dense, gram):
        return tf.concat([dense, tf.gather(tf.reshape(gram, [-1, n * n]), index, axis=1)], axis=1)

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def spread(grad):
        padded = tf.pad(grad[:, dim:], [[0, 0], [0, 1]])
        full = tf.gather(padded, spread_index, axis=1)
        if self_interaction:
            full = full * tf.constant(scale, full.dtype)
        return tf.reshape(full, [-1, n, n])

    return take, spread


def dot_compiled(dense, embeddings, self_interaction: bool = False):
    """The dot interaction with its triangle taken (and its gradient spread) by
    :func:`compiled_triangle`, the Gram matrix and its gradient by TensorFlow's (oneDNN's)
    batched matmul: ``d vectors = G @ vectors``.  The same numbers as the gather up to float32
    rounding (the two halves of the gradient are added before the product, not after)."""
    n, dim = embeddings.shape[1] + 1, dense.shape[-1]
    take, spread = compiled_triangle(n, dim, self_interaction)

    @tf.custom_gradient
    def interact(dense, embeddings):
        vectors = tf.concat([tf.expand_dims(dense, 1), tf.cast(embeddings, dense.dtype)], axis=1)
        gram = tf.matmul(vectors, vectors, transpose_b=True)

        def grad(upstream):
            d_vectors = tf.matmul(spread(upstream), vectors)  # [batch, n, dim]
            return upstream[:, :dim] + d_vectors[:, 0], tf.cast(d_vectors[:, 1:], embeddings.dtype)

        return take(dense, gram), grad

    return interact(dense, embeddings)


class DotInteraction(tf.keras.layers.Layer):
    """Pairwise dot products of the dense vector and every embedding vector.

    DLRM's dot interaction (the factorization-machine-like second-order term): the
    dense vector (the bottom MLP's output) and the ``features`` embedding vectors
    are ``features + 1`` vectors of the same width; the output keeps the dense
    vector and appends the distinct pairwise dot products among them.

    Inputs: ``dense [batch, dim]`` and ``embeddings [batch, features, dim]``.
    Output: ``[batch, dim + pairs]``: the dense vector followed by the
    ``(features + 1) * features / 2`` dot products of distinct vectors (plus the
    ``features + 1`` squared norms with ``self_interaction=True``).

    The lower triangle of the Gram matrix is taken with a static ``tf.gather`` in
    float32, not ``tf.boolean_mask``, so the layer compiles under XLA.  (Measured against
    slicing each row of the triangle, a transposed gather and per-pair products, forward
    and backward, float32 and bfloat16: the gather was as fast or faster.)  In bfloat16 a
    product with a 0/1 selection matrix takes the same entries exactly, faster (``pick``).
    The fast training step asks for ``pick="compiled"`` (:func:`dot_compiled`): the triangle
    and its gradient by XLA, the Gram matrix's gradient by one batched matmul.
    Embeddings are cast to the layer's compute dtype (bfloat16 under a ``mixed_bfloat16``
    policy).

    The pairs are in the order of :func:`dot_pair_indices`: the Gram matrix's lower
    triangle, row-major, as the reference DLRM and TFRS's ``DotInteraction``.

    Args:
      self_interaction: Boolean, whether to also take each vector's dot product
        with itself (the Gram matrix's diagonal, the ``features + 1`` squared
        norms).  Default ``False``, as the reference DLRM.
      **kwargs: Passed to ``tf.keras.layers.Layer`` (``name``, ``dtype``, ...).
    """

    def __init__(self, self_interaction: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.self_interaction = bool(self_interaction)

    def call(self, dense, embeddings, pick=None):
        """Concatenates ``dense`` and the pairwise dot products of all the vectors.

        Args:
          dense: ``[batch, dim]`` tensor, the bottom MLP's output.
          embeddings: ``[batch, features, dim]`` tensor, one vector per categorical
            feature; cast to ``dense``'s dtype.
          pick: how the triangle is taken from the Gram matrix: ``"gather"`` (a static
            ``tf.gather``), ``"matmul"`` (a product with a 0/1 selection matrix, one 1 a
            column: the same numbers, and oneDNN's bfloat16 matmul and its gradient run faster
            than the gather and its scatter-add) or ``"compiled"`` (:func:`dot_compiled`: two
            small XLA functions and a custom gradient, for training; not for a SavedModel,
            whose server may have no XLA); default ``matmul`` in bfloat16, else ``gather``.
            Use ``gather`` inside XLA, whose CPU matmuls are float32.

        Returns:
          ``[batch, dim + pairs]`` tensor, with ``pairs = (features + 1) * features / 2``
          (``(features + 1) * (features + 2) / 2`` with ``self_interaction=True``).

        Raises:
          ValueError: if ``dense`` and ``embeddings`` differ in width (the bottom
            MLP's output width must equal the embedding dim).
        """
        if dense.shape[-1] != embeddings.shape[-1]:
            raise ValueError(
                "dot interaction needs the bottom MLP's output width to equal the embedding "
                f"dim; got {dense.shape[-1]} and {embeddings.shape[-1]}."
            )
        if pick == "compiled":
            return dot_compiled(dense, embeddings, self.self_interaction)
        embeddings = tf.cast(embeddings, dense.dtype)
        vectors = tf.concat([tf.expand_dims(dense, 1), embeddings], axis=1)  # [batch, n, dim]
        n = vectors.shape[1]
        gram = tf.matmul(vectors, vectors, transpose_b=True)  # [batch, n, n]
        flat = tf.reshape(gram, [-1, n * n])
        if pick is None:
            pick = "matmul" if flat.dtype == tf.bfloat16 else "gather"
        if pick == "matmul":
            pairs = tf.matmul(flat, tf.constant(selection_matrix(n, self.self_interaction), flat.dtype))
        elif pick == "gather":
            pairs = tf.gather(flat, dot_pair_indices(n, self.self_interaction), axis=1)
        else:
            raise ValueError(f"pick must be gather, matmul or compiled, got {pick!r}.")
        return tf.concat([dense, pairs], axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(self_interaction=self.self_interaction)
        return config


class CatInteraction(tf.keras.layers.Layer):
    """Plain concatenation.

    The interaction-free alternative to :class:`DotInteraction`: the embedding
    vectors are flattened and appended to the dense vector, so the top MLP sees
    every input unmixed and ``d`` need not equal ``dim``.

    Inputs: ``dense [batch, d]`` and ``embeddings [batch, features, dim]``.
    Output: ``[batch, d + features * dim]``.

    Args:
      **kwargs: Passed to ``tf.keras.layers.Layer`` (``name``, ``dtype``, ...).  The
        layer has no arguments of its own, so the base ``get_config`` holds them all
        and ``CatInteraction.from_config(layer.get_config())`` rebuilds it.
    """

    def call(self, dense, embeddings):
        """Concatenates ``dense`` and the flattened embeddings.

        Args:
          dense: ``[batch, d]`` tensor.
          embeddings: ``[batch, features, dim]`` tensor (``features`` and ``dim``
            known statically); cast to ``dense``'s dtype.

        Returns:
          ``[batch, d + features * dim]`` tensor.
        """
        flat = tf.cast(tf.reshape(embeddings, [-1, embeddings.shape[1] * embeddings.shape[2]]), dense.dtype)
        return tf.concat([dense, flat], axis=1)


def make_interaction(kind: str, self_interaction: bool = False, **kwargs) -> tf.keras.layers.Layer:
    if kind == "dot":
        return DotInteraction(self_interaction=self_interaction, **kwargs)
    if kind == "cat":
        return CatInteraction(**kwargs)
    raise ValueError(f"interaction must be one of {INTERACTIONS}, got {kind!r}.")
