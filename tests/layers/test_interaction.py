import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfdlrm.layers.interaction import CatInteraction, DotInteraction
from tfdlrm.sizes import dot_output_width


def numpy_dot(dense, emb, self_interaction):
    vectors = np.concatenate([dense[:, None, :], emb], axis=1)
    n = vectors.shape[1]
    out = []
    for b in range(len(dense)):
        pairs = [vectors[b, i] @ vectors[b, j] for i in range(n) for j in range(i + (1 if self_interaction else 0))]
        out.append(np.concatenate([dense[b], pairs]))
    return np.array(out)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 6, 4)).astype(np.float32)


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_matches_numpy(inputs, self_interaction):
    dense, emb = inputs
    out = DotInteraction(self_interaction=self_interaction)(dense, emb).numpy()
    assert out.shape == (5, dot_output_width(4, 6, self_interaction))
    np.testing.assert_allclose(out, numpy_dot(dense, emb, self_interaction), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_matches_tfrs(inputs, self_interaction):
    dense, emb = inputs
    ours = DotInteraction(self_interaction=self_interaction)(dense, emb).numpy()
    reference = tfrs.layers.feature_interaction.DotInteraction(self_interaction=self_interaction)(
        [dense] + [emb[:, i] for i in range(emb.shape[1])]).numpy()
    np.testing.assert_allclose(ours[:, 4:], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours[:, :4], dense)


def test_dot_compiles_with_xla(inputs):
    dense, emb = inputs
    layer = DotInteraction()
    compiled = tf.function(lambda d, e: layer(d, e), jit_compile=True)
    np.testing.assert_allclose(compiled(dense, emb).numpy(), layer(dense, emb).numpy(), rtol=1e-5, atol=1e-5)
    graph = tf.function(lambda d, e: layer(d, e)).get_concrete_function(dense, emb).graph
    assert not any(op.type in ("Where", "BooleanMask") for op in graph.get_operations())


def test_dot_rejects_width_mismatch():
    with pytest.raises(ValueError, match="embedding dim"):
        DotInteraction()(np.zeros((2, 3), np.float32), np.zeros((2, 5, 4), np.float32))


def test_cat_is_concatenation(inputs):
    dense, emb = inputs
    out = CatInteraction()(dense, emb).numpy()
    np.testing.assert_array_equal(out, np.concatenate([dense, emb.reshape(5, -1)], axis=1))


def test_config_round_trip():
    layer = DotInteraction(self_interaction=True, name="x")
    assert DotInteraction.from_config(layer.get_config()).self_interaction is True
    assert CatInteraction.from_config(CatInteraction(name="c").get_config()).name == "c"


def output_and_gradients(layer, dense, emb, upstream, pick):
    """The output's dtype, and the output with d(sum(upstream * output)) / d(dense, emb) as float32 numpy."""
    with tf.GradientTape() as tape:
        tape.watch([dense, emb])
        out = layer(dense, emb, pick=pick)
        loss = tf.reduce_sum(tf.cast(out * upstream, tf.float32))
    grads = tape.gradient(loss, [dense, emb])
    return out.dtype, [out.numpy().astype(np.float32)] + [g.numpy().astype(np.float32) for g in grads]


@pytest.mark.parametrize("self_interaction", [False, True])
def test_bf16_selection_matmul_equals_the_gather_forward_and_backward(self_interaction):
    """In bfloat16 the triangle is taken by a 0/1 matrix product (the default there): the same
    numbers as the gather, bit for bit, and the same gradients."""
    rng = np.random.default_rng(3)
    dense = tf.constant(rng.normal(size=(64, 8)), tf.bfloat16)
    emb = tf.constant(rng.normal(size=(64, 5, 8)), tf.float32)
    upstream = tf.constant(rng.normal(size=(64, 8 + (6 * 7 if self_interaction else 6 * 5) // 2)), tf.bfloat16)
    layer = DotInteraction(self_interaction=self_interaction, dtype="mixed_bfloat16")
    results = {pick: output_and_gradients(layer, dense, emb, upstream, pick)[1] for pick in ("matmul", "gather")}
    assert layer(dense, emb).dtype == tf.bfloat16
    np.testing.assert_array_equal(layer(dense, emb).numpy().astype(np.float32), results["gather"][0])  # default
    for a, b in zip(results["matmul"], results["gather"]):
        np.testing.assert_array_equal(a, b)
    expected = numpy_dot(dense.numpy().astype(np.float32), tf.cast(tf.cast(emb, tf.bfloat16), tf.float32).numpy(),
                         self_interaction)
    np.testing.assert_allclose(results["matmul"][0], expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="pick must be gather, matmul or compiled"):
        layer(dense, emb, pick="slice")


@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_compiled_triangle_equals_the_gather_forward_and_backward(self_interaction, dtype):
    """The fast step's interaction (``pick="compiled"``: the triangle and its gradient by XLA, the
    Gram matrix's gradient as one product with a symmetric matrix): the forward bit for bit, the
    gradients to the rounding of the dtype, against the gather and against numpy."""
    rng = np.random.default_rng(4)
    compute = tf.bfloat16 if dtype == "mixed_bfloat16" else tf.float32
    dense = tf.constant(rng.normal(size=(48, 8)), compute)
    emb = tf.constant(rng.normal(size=(48, 6, 8)), tf.float32)
    width = 8 + (7 * 8 if self_interaction else 7 * 6) // 2
    upstream = tf.constant(rng.normal(size=(48, width)), compute)
    layer = DotInteraction(self_interaction=self_interaction, dtype=dtype)
    results = {}
    for pick in ("compiled", "gather"):
        dtype_out, results[pick] = output_and_gradients(layer, dense, emb, upstream, pick)
        assert dtype_out == compute
    np.testing.assert_array_equal(results["compiled"][0], results["gather"][0])
    tolerance = 2e-2 if compute == tf.bfloat16 else 1e-5
    for a, b in zip(results["compiled"][1:], results["gather"][1:]):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)
    # d(sum(upstream * out)) / d vectors by hand: sum over pairs (i, j) of g_p * v_j into v_i and g_p * v_i into v_j
    vectors = np.concatenate([dense.numpy().astype(np.float64)[:, None],
                              tf.cast(tf.cast(emb, compute), tf.float64).numpy()], axis=1)
    g = upstream.numpy().astype(np.float64)
    expected = np.zeros_like(vectors)
    p = 8
    for i in range(7):
        for j in range(i + (1 if self_interaction else 0)):
            expected[:, i] += g[:, p, None] * vectors[:, j]
            expected[:, j] += g[:, p, None] * vectors[:, i]
            p += 1
    expected[:, 0] += g[:, :8]
    np.testing.assert_allclose(results["compiled"][1], expected[:, 0], rtol=tolerance * 5, atol=tolerance * 5)
    np.testing.assert_allclose(results["compiled"][2], expected[:, 1:], rtol=tolerance * 5, atol=tolerance * 5)


def test_compiled_triangle_takes_a_short_last_batch():
    layer = DotInteraction()
    rng = np.random.default_rng(5)
    for rows in (16, 5):
        dense, emb = rng.normal(size=(rows, 4)).astype(np.float32), rng.normal(size=(rows, 3, 4)).astype(np.float32)
        np.testing.assert_array_equal(layer(dense, emb, pick="compiled").numpy(), layer(dense, emb).numpy())
