import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.metrics import exact_auc
from tfdlrm.pipelines.generators import RandomData, SyntheticData
from tfdlrm.pipelines.sources import SYNTHETIC_BLOCK, open_data
from tfdlrm.presets import get_preset


def collect(dataset):
    xs, ys = [], []
    for x, y in dataset:
        xs.append({k: v.numpy() for k, v in x.items()})
        ys.append(y.numpy())
    return xs, ys


def test_random_one_hot_shapes_ranges_and_labels():
    rows = (5, 100, 1000)
    data = RandomData(rows, num_dense=4, seed=3)
    (x,), (y,) = collect(data.dataset(batch_size=4000, num_batches=1))
    assert x["dense"].shape == (4000, 4) and x["dense"].dtype == np.float32
    assert 0 <= x["dense"].min() and x["dense"].max() < 1
    assert x["sparse"].shape == (4000, 3) and x["sparse"].dtype == np.int64
    for f, r in enumerate(rows):
        assert x["sparse"][:, f].min() >= 0 and x["sparse"][:, f].max() < r
    assert len(np.unique(x["sparse"][:, 0])) == 5  # uniform ids cover a small table
    assert set(np.unique(y)) == {0.0, 1.0} and abs(y.mean() - 0.5) < 0.05


def test_random_normal_dense_and_fixed_bags():
    data = RandomData((50, 60), num_dense=3, ids_per_lookup=4, dense_distribution="normal")
    (x,), _ = collect(data.dataset(2000, 1))
    assert x["sparse"].shape == (2000, 2, 4)
    assert abs(x["dense"].mean()) < 0.1 and abs(x["dense"].std() - 1) < 0.1


def test_random_variable_bags_have_1_to_k_ids():
    data = RandomData((50, 60, 70), num_dense=2, ids_per_lookup=5, variable_bags=True)
    x, _ = data.batch(tf.constant(0, tf.int64), 1000)
    sparse = x["sparse"]
    assert isinstance(sparse, tf.RaggedTensor) and sparse.shape[:2] == (1000, 3)
    lengths = sparse.values.row_lengths().numpy()
    assert lengths.min() == 1 and lengths.max() == 5
    assert set(np.unique(lengths)) == {1, 2, 3, 4, 5}
    per_table = sparse.to_list()
    for f, rows in enumerate((50, 60, 70)):
        assert max(max(ex[f]) for ex in per_table) < rows


def test_generators_are_deterministic_and_seed_dependent():
    a = collect(RandomData((10, 20), 3, seed=1).dataset(8, 3))
    b = collect(RandomData((10, 20), 3, seed=1).dataset(8, 3))
    c = collect(RandomData((10, 20), 3, seed=2).dataset(8, 3))
    np.testing.assert_array_equal(a[0][2]["sparse"], b[0][2]["sparse"])
    assert not np.array_equal(a[0][2]["sparse"], c[0][2]["sparse"])
    s1 = SyntheticData((100,) * 26, seed=5).batch(tf.constant(3, tf.int64), 64)
    s2 = SyntheticData((100,) * 26, seed=5).batch(tf.constant(3, tf.int64), 64)
    np.testing.assert_array_equal(s1[0]["sparse"].numpy(), s2[0]["sparse"].numpy())
    np.testing.assert_array_equal(s1[1].numpy(), s2[1].numpy())


def test_start_batch_skips_exactly():
    data = RandomData((10, 20), 3, seed=1)
    full = collect(data.dataset(8, 5))
    tail = collect(data.dataset(8, 5, start_batch=2))
    assert len(tail[0]) == 3
    np.testing.assert_array_equal(full[0][2]["sparse"], tail[0][0]["sparse"])


def test_synthetic_is_skewed_learnable_and_calibrated():
    gen = SyntheticData((10_000,) * 26, seed=0)
    x, y, p = gen.batch(tf.constant(0, tf.int64), 50_000, "eval", with_teacher=True)
    ids = x["sparse"].numpy()
    assert ids.min() >= 0 and ids.max() < 10_000
    counts = np.bincount(ids[:, 0], minlength=10_000)
    top_1pct = np.sort(counts)[::-1][:100].sum() / counts.sum()
    assert top_1pct > 0.3  # Zipf-like: 1% of ids carry a large share of lookups
    assert 0.22 < y.numpy().mean() < 0.28  # ~25% click rate
    teacher = exact_auc(y.numpy(), p.numpy())
    assert 0.72 < teacher < 0.9
    assert (x["dense"].numpy() >= 0).all()


def test_synthetic_source_is_independent_of_batch_size():
    config = get_preset("tiny", rows=100)
    source = open_data("synthetic", config, train_examples=4 * SYNTHETIC_BLOCK, eval_examples=SYNTHETIC_BLOCK)
    small = np.concatenate([y.numpy() for _, y in source.eval_dataset(100)])
    large = np.concatenate([y.numpy() for _, y in source.eval_dataset(1024)])
    np.testing.assert_array_equal(small, large)
    assert len(small) == SYNTHETIC_BLOCK
    assert source.train_batches(1000) == len(list(source.train_dataset(1000, seed=1))) == 5


def test_training_order_follows_seed_but_rows_do_not_change():
    config = get_preset("tiny", rows=100)
    source = open_data("synthetic", config, train_examples=8 * SYNTHETIC_BLOCK, eval_examples=SYNTHETIC_BLOCK)

    def first_labels(seed):
        return np.concatenate([y.numpy().ravel() for _, y in source.train_dataset(SYNTHETIC_BLOCK, seed=seed)])

    a, b, c = first_labels(1), first_labels(1), first_labels(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(a.tolist()) == sorted(c.tolist())  # same rows, other order


def test_bad_generator_requests():
    config = get_preset("tiny")
    with pytest.raises(UserError, match="at least 1024"):
        open_data("synthetic", config, train_examples=100)
    with pytest.raises(UserError, match="must be positive"):
        open_data("random", config, eval_examples=0)
    with pytest.raises(UserError, match="use --data random"):
        open_data("synthetic", get_preset("paper-benchmark"))
    with pytest.raises(UserError, match="unknown data"):
        open_data("nonsense", config)
    with pytest.raises(UserError, match="dense distribution"):
        RandomData((5,), 2, dense_distribution="poisson")
