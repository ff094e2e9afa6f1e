import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.layers.embedding import EmbeddingTables

ROWS = [7, 3, 11]
DIM = 4


def tables_of(layer):
    return [t.numpy() for t in layer.tables]


def make_layer(**kwargs):
    layer = EmbeddingTables(ROWS, DIM, **kwargs)
    layer.build(tf.TensorShape([None, len(ROWS)]))
    return layer


def test_one_hot_lookup_matches_numpy():
    layer = make_layer()
    ids = np.array([[0, 2, 10], [6, 0, 5]], np.int64)
    out = layer(ids).numpy()
    tables = tables_of(layer)
    expected = np.stack([np.stack([tables[f][ids[b, f]] for f in range(3)]) for b in range(2)])
    assert out.shape == (2, 3, DIM)
    np.testing.assert_allclose(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_fixed_bags_pool_like_numpy(pooling):
    layer = make_layer(pooling=pooling)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, r, size=(5, 4)) for r in ROWS], axis=1)  # [5, 3, 4]
    out = layer(ids).numpy()
    tables = tables_of(layer)
    reduce = np.sum if pooling == "sum" else np.mean
    expected = np.array([[reduce(tables[f][ids[b, f]], axis=0) for f in range(3)] for b in range(5)])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_ragged_bags_pool_like_numpy(pooling):
    layer = make_layer(pooling=pooling)
    bags = [
        [[0, 1, 6], [2], [10, 10]],
        [[3], [0, 1, 2, 0], [4]],
        [[], [1], [0, 5, 9]],  # an empty bag pools to zeros
    ]
    ids = tf.ragged.constant(bags, dtype=tf.int64, ragged_rank=2)
    out = layer(ids).numpy()
    tables = tables_of(layer)
    expected = np.zeros((3, 3, DIM), np.float32)
    for b, example in enumerate(bags):
        for f, bag in enumerate(example):
            if bag:
                vectors = tables[f][bag]
                expected[b, f] = vectors.sum(0) if pooling == "sum" else vectors.mean(0)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_initialisation_is_the_references_uniform():
    layer = EmbeddingTables([10_000, 4], 8)
    layer.build(tf.TensorShape([None, 2]))
    big = layer.tables[0].numpy()
    bound = np.sqrt(1 / 10_000)
    assert big.min() >= -bound and big.max() <= bound
    # Uniform on [-b, b] has standard deviation b / sqrt(3).
    assert abs(big.std() - bound / np.sqrt(3)) < 0.02 * bound
    assert np.abs(layer.tables[1].numpy()).max() <= np.sqrt(1 / 4)


@pytest.mark.parametrize("bad_id, feature", [(7, "C1"), (-1, "C1"), (3, "C2"), (11, "C3")])
def test_out_of_range_id_names_the_feature(bad_id, feature):
    layer = make_layer()
    ids = np.array([[0, 0, 0], [1, 1, 1]], np.int64)
    column = int(feature[1:]) - 1
    ids[1, column] = bad_id
    rows = ROWS[column]
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf'feature {feature} .* \[0, {rows}\), got id {bad_id}'):
        layer(ids)
    # Also inside a traced function (graph mode), not just eagerly.
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"feature {feature} "):
        tf.function(layer)(tf.constant(ids))


def test_out_of_range_id_in_ragged_bag_names_the_feature():
    layer = make_layer()
    ids = tf.ragged.constant([[[0], [1], [2]], [[1, 2], [0, 3], [4]]], dtype=tf.int64, ragged_rank=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature C2 .* got id 3"):
        layer(ids)


def test_out_of_range_check_can_be_switched_off():
    layer = make_layer(check_ids=False)
    # On CPU, gather itself still refuses; the point is that no assertion op is added.
    concrete = tf.function(layer).get_concrete_function(tf.TensorSpec([None, 3], tf.int64))
    assert not any(op.type == "Assert" for op in concrete.graph.get_operations())


def test_wrong_feature_count_and_dtype_are_refused():
    layer = EmbeddingTables(ROWS, DIM)
    with pytest.raises(ValueError, match="expected ids for 3 categorical features, got 2"):
        layer(np.zeros((4, 2), np.int64))
    layer = make_layer()
    with pytest.raises(ValueError, match="must be int32 or int64"):
        layer(np.zeros((4, 3), np.float32))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one row"):
        EmbeddingTables([5, 0], 4)
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingTables([5], 4, pooling="max")
    with pytest.raises(ValueError, match="dim must be positive"):
        EmbeddingTables([5], 0)


def test_gradient_is_sparse_and_touches_only_looked_up_rows():
    layer = make_layer()
    ids = np.array([[1, 2, 3], [1, 0, 3]], np.int64)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids))
    grads = tape.gradient(loss, layer.tables)
    assert all(isinstance(g, tf.IndexedSlices) for g in grads)
    dense = tf.convert_to_tensor(grads[0]).numpy()
    touched = np.flatnonzero(np.abs(dense).sum(1))
    assert touched.tolist() == [1]
    np.testing.assert_allclose(dense[1], 2.0)  # looked up twice, d(sum)/d(row) = 1 each


def test_get_config_round_trip():
    layer = EmbeddingTables(ROWS, DIM, pooling="mean", feature_names=["a", "b", "c"], check_ids=False, name="emb")
    clone = EmbeddingTables.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.rows, clone.dim, clone.pooling, clone.feature_names, clone.check_ids) == (
        ROWS, DIM, "mean", ["a", "b", "c"], False)
