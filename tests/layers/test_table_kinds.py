"""Memory-saving tables (issue 25): quotient-remainder (QR) and mixed-dimension (MD) tables.

Each id's vector is checked against numpy on the layer's own weights (brute force: every id's rows
combined, then the bag pooled), for one-hot ids, fixed bags and ragged bags; the fast training step
against Keras's stock step; the layout (tfdlrm.tables) against the reference's formulas.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.layers.embedding import EmbeddingTables
from tfdlrm.presets import get_preset
from tfdlrm.sizes import parameter_count
from tfdlrm.tables import md_dims, table_specs
from tfdlrm.training.compile import build_model, compile_model

ROWS = [1000, 150, 777]


def brute_vectors(layer, f, ids):
    """Feature ``f``'s vector for every id in ``ids`` (numpy, any shape), from the layer's weights."""
    spec = layer.specs[f]
    tables = [layer.tables[i].numpy() for i in layer.parts_of[f]]
    if spec.kind == "qr":
        q, r = tables[0][ids // spec.collisions], tables[1][ids % spec.collisions]
        return {"mult": q * r, "add": q + r, "concat": np.concatenate([q, r], axis=-1)}[spec.operation]
    if spec.kind == "md":
        return tables[0][ids] @ layer.projections[f].numpy()
    return tables[0][ids]


def random_weights(layer, seed=0):
    """Every variable random, so that the init's ones and zeros hide no mistake."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape).astype(np.float32))


@pytest.mark.parametrize("options", [
    dict(qr_collisions=4, qr_operation="mult"),
    dict(qr_collisions=7, qr_operation="add", qr_threshold=200),
    dict(qr_collisions=60, qr_operation="concat", qr_threshold=0),
    dict(md_temperature=0.5, md_threshold=0),
    dict(md_temperature=0.3, md_threshold=200, qr_collisions=3, qr_threshold=800),
], ids=["qr-mult", "qr-add", "qr-concat", "md", "qr+md"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_each_ids_vector_and_every_bag_equal_numpy(options, pooling):
    layer = EmbeddingTables(ROWS, 8, pooling=pooling, **options)
    rng = np.random.default_rng(1)
    one_hot = np.stack([rng.integers(0, r, 16) for r in ROWS], axis=1)
    layer(one_hot)
    random_weights(layer)
    assert {s.kind for s in layer.specs} != {"full"}
    want = np.stack([brute_vectors(layer, f, one_hot[:, f]) for f in range(3)], axis=1)
    np.testing.assert_allclose(layer(one_hot).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.embed(tf.constant(one_hot)).numpy(), want, rtol=1e-5, atol=1e-5)
    assert want.shape[-1] == layer.dim == (16 if options.get("qr_operation") == "concat" else 8)
    # fixed bags of 3 ids and ragged bags (an empty one included): each id's vector, then the pool
    bags = np.stack([rng.integers(0, r, (16, 3)) for r in ROWS], axis=1)
    pool = np.sum if pooling == "sum" else np.mean
    want = np.stack([pool(brute_vectors(layer, f, bags[:, f]), axis=1) for f in range(3)], axis=1)
    np.testing.assert_allclose(layer(bags).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.embed(tf.constant(bags)).numpy(), want, rtol=1e-5, atol=1e-5)
    ragged = [[list(rng.integers(0, r, n)) for r, n in zip(ROWS, (2, 0, 5))] for _ in range(4)]
    got = layer(tf.ragged.constant(ragged, dtype=tf.int64)).numpy()
    for b, example in enumerate(ragged):
        for f, ids in enumerate(example):
            expected = (pool(brute_vectors(layer, f, np.array(ids)), axis=0) if ids else np.zeros(layer.dim))
            np.testing.assert_allclose(got[b, f], expected, rtol=1e-5, atol=1e-5)


def test_the_reference_pools_qr_parts_first_which_is_not_the_bag_of_the_ids_vectors():
    # Why the layer combines before pooling: with mult, (q1 + q2) * (r1 + r2) != q1 r1 + q2 r2.
    layer = EmbeddingTables([1000], 4, qr_collisions=4)
    ids = np.array([[[5, 10]]])
    layer(ids)
    random_weights(layer)
    q, r = layer.tables[0].numpy(), layer.tables[1].numpy()
    pooled_first = (q[1] + q[2]) * (r[1] + r[2])
    exact = q[1] * r[1] + q[2] * r[2]
    np.testing.assert_allclose(layer(ids).numpy()[0, 0], exact, rtol=1e-6)
    assert not np.allclose(pooled_first, exact)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_vectors_start_at_a_plain_tables_scale(operation):
    rows = 40_000
    layer = EmbeddingTables([rows], 16, qr_collisions=200, qr_operation=operation)
    tf.keras.utils.set_random_seed(3)
    ids = np.arange(rows)[:, None]
    vectors = layer(ids).numpy()
    bound = 1 / math.sqrt(rows)
    assert np.abs(vectors).max() <= math.sqrt(3) * bound
    # a plain table's U(-b, b): mean 0, variance b^2 / 3 (within the noise of 200 x 16 values a part)
    assert abs(vectors.mean()) < 0.02 * bound
    assert vectors.var() == pytest.approx(bound ** 2 / 3, rel=0.06)
    assert len(np.unique(vectors, axis=0)) == rows  # every id its own vector
    # the reference's parts, U(sqrt(1/rows), 1) each: a sum near 1 per value, far from that scale
    rng = np.random.default_rng(0)
    q, r = rng.uniform(bound, 1, (rows // 200, 16)), rng.uniform(bound, 1, (200, 16))
    reference = q[ids[:, 0] // 200] + r[ids[:, 0] % 200]
    assert reference.mean() > 100 * bound


def reference_md_solver(rows, alpha, d0, round_dims=False):
    """The reference's md_solver (tricks/md_embedding_bag.py) with d0 and one query per row, in numpy:
    sort ascending, lambda = d0 * n_min^alpha, d = round(lambda * n^-alpha), the smallest d0, at least 1."""
    n = np.array(rows, np.float64)
    order = np.argsort(n, kind="stable")
    lam = d0 * n[order[0]] ** alpha
    d = np.maximum(1, np.round(lam * n ** -alpha))
    d[order[0]] = d0
    if round_dims:
        d = 2 ** np.round(np.log2(d))
    return [int(v) for v in d]


def test_the_layout_follows_the_references_formulas():
    config = get_preset("kaggle", dense_norm="none").replace(
        table_rows=(10_000_000, 100, 201, 5), qr_collisions=4, qr_threshold=200)
    q = table_specs(config)
    assert [s.kind for s in q] == ["qr", "full", "qr", "full"]
    assert [(p.rows, p.width) for p in q[0].parts] == [(2_500_000, 16), (4, 16)]
    assert [(p.rows, p.width) for p in q[2].parts] == [(51, 16), (4, 16)]
    # md_solver with d0 = 16: the smallest table keeps 16, a table n times larger n^-alpha of it
    assert md_dims([201, 5, 100, 10_000_000], 0.3, 16) == reference_md_solver([201, 5, 100, 10_000_000], 0.3, 16)
    assert md_dims([201, 5, 100, 10_000_000], 0.3, 16) == [5, 16, 7, 1]
    assert md_dims([5, 100, 10_000_000, 3000], 0.5, 16, round_dims=True) == reference_md_solver(
        [5, 100, 10_000_000, 3000], 0.5, 16, round_dims=True) == [16, 4, 1, 1]
    md = table_specs(config.replace(qr_collisions=None, md_temperature=0.3, md_threshold=150))
    assert [s.kind for s in md] == ["md", "full", "md", "full"]  # 100 rows: below the threshold
    assert [(p.rows, p.width) for p in md[0].parts] == [(10_000_000, 1), (1, 16)]
    # parameter counts: the model's own against the closed form
    small = get_preset("tiny", dense_norm="none").replace(table_rows=(1000, 150, 777) + (20,) * 23)
    for options in (dict(qr_collisions=4), dict(md_temperature=0.3, md_threshold=100),
                    dict(qr_collisions=5, qr_operation="concat", bottom_mlp=(13, 32, 16))):
        for name in ("dlrm", "dcn"):
            c = small.replace(**options)
            assert build_model(name, c).count_params() == parameter_count(name, c), (name, options)


@pytest.mark.parametrize("change, message", [
    (dict(qr_collisions=1), "--qr-collisions must be at least 2"),
    (dict(qr_collisions=4, qr_operation="concat"), "bottom MLP to end in 16"),
    (dict(qr_collisions=4, qr_operation="max"), "--qr-operation must be one of mult, add, concat"),
    (dict(md_temperature=0.0), "--md-temperature must be in (0, 1]"),
    (dict(md_temperature=1.5), "--md-temperature must be in (0, 1]"),
    (dict(qr_threshold=-1), "--qr-threshold must be >= 0"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        get_preset("tiny").replace(**change)


def small_config(**options):
    return get_preset("tiny", dense_norm="none").replace(table_rows=(1000, 150, 777, 40), **options)


def batches(config, n=64, count=2, k=1):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        shape = (n,) if k == 1 else (n, k)
        sparse = np.stack([rng.integers(0, r, shape) for r in config.table_rows], axis=1)
        out.append(({"dense": rng.random((n, 13)).astype(np.float32), "sparse": sparse.astype(np.int64)},
                    rng.integers(0, 2, (n, 1)).astype(np.float32)))
    return out


@pytest.mark.parametrize("options, optimizer, k", [
    (dict(qr_collisions=4), "sgd", 1),
    (dict(qr_collisions=4, qr_operation="add"), "adagrad", 1),
    (dict(md_temperature=0.3, md_threshold=100), "adagrad", 1),
    (dict(qr_collisions=3, qr_operation="mult", md_temperature=0.5, md_threshold=100, qr_threshold=900),
     "sgd", 3),
])
def test_the_fast_step_trains_qr_and_md_tables_like_the_stock_step(options, optimizer, k):
    config = small_config(ids_per_lookup=k, **options)
    data = batches(config, k=k)
    results = {}
    for xla in ("off", "sparse", "full"):
        tf.keras.utils.set_random_seed(5)
        net = build_model("dlrm", config)
        compile_model(net, optimizer, 0.1, metrics=False, xla=xla)
        losses = [float(net.train_on_batch(x, y)) for x, y in data]
        results[xla] = (losses, [v.numpy() for v in net.trainable_variables])
        if xla != "off":  # row updates only: Adagrad's slots for the row parts, SGD none
            assert net.fast_step is not None
    for xla in ("sparse", "full"):
        assert results[xla][0] == pytest.approx(results["off"][0], abs=1e-5), xla
        for a, b in zip(results["off"][1], results[xla][1]):
            np.testing.assert_allclose(a, b, atol=2e-4 if optimizer == "adagrad" else 2e-5, err_msg=xla)


def test_the_fast_step_updates_only_the_looked_up_rows_of_each_part():
    config = small_config(qr_collisions=4)
    tf.keras.utils.set_random_seed(5)
    net = build_model("dlrm", config)
    compile_model(net, "sgd", 0.1, metrics=False)
    (x, y), = batches(config, n=8, count=1)
    quotient, remainder = net.sparse_arch.tables[0], net.sparse_arch.tables[1]
    before_q, before_r = quotient.numpy(), remainder.numpy()
    net.train_on_batch(x, y)
    changed = np.flatnonzero(np.any(before_q != quotient.numpy(), axis=1))
    assert 0 < len(changed) and set(changed) <= set(x["sparse"][:, 0] // 4)
    changed = np.flatnonzero(np.any(before_r != remainder.numpy(), axis=1))
    assert set(changed) <= set(x["sparse"][:, 0] % 4)


def test_an_out_of_range_id_is_refused_before_any_part_changes():
    config = small_config(qr_collisions=4)
    net = build_model("dlrm", config)
    compile_model(net, "sgd", 0.1, metrics=False)
    (x, y), = batches(config, n=8, count=1)
    x["sparse"][3, 2] = 777
    before = [t.numpy() for t in net.sparse_arch.tables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature C3 .* got id 777"):
        net.train_on_batch(x, y)
    for b, t in zip(before, net.sparse_arch.tables):
        np.testing.assert_array_equal(b, t.numpy())


def test_a_run_of_one_table_kind_is_not_resumed_as_another(tmp_path):
    from tfdlrm.training.loop import train
    from tfdlrm.training.spec import TrainSpec

    def spec(epochs=1, **overrides):
        return TrainSpec(model="dlrm", preset="tiny", rows=500, train_examples=1024, eval_examples=1024, batch_size=512,
                         out=str(tmp_path / "run"), verbose=0, overrides=overrides, epochs=epochs,
                         xla="off")  # checkpoints are the point here; the fast step: above

    train(spec(qr_collisions=4), log=lambda s: None)
    with pytest.raises(UserError, match=r"embedding tables: qr mult 4 collisions over 200 rows != full"):
        train(spec(), log=lambda s: None)
    assert small_config(qr_collisions=4).differences(small_config(qr_collisions=4, qr_operation="add")) == [
        "embedding tables: qr mult 4 collisions over 200 rows != qr add 4 collisions over 200 rows"]
    # the same kind continues from its checkpoint (a second epoch), every part restored
    from tfdlrm.training.rundir import load_run

    first, _ = load_run(str(tmp_path / "run"))
    lines = []
    train(spec(epochs=2, qr_collisions=4), log=lines.append)
    assert any("resum" in line for line in lines), lines
    second, _ = load_run(str(tmp_path / "run"))
    assert len(first.sparse_arch.tables) == len(second.sparse_arch.tables) == 52
    assert all(np.any(a.numpy() != b.numpy()) for a, b in zip(first.sparse_arch.tables[:2], second.sparse_arch.tables))
    # the saved model is rebuilt with its own tables
    model, meta = load_run(str(tmp_path / "run"))
    assert [s.kind for s in model.sparse_arch.specs] == ["qr"] * 26
    assert meta["tables"]["tables"][0]["variables"] == [["table_C1_quotient", 125, 8], ["table_C1_remainder", 4, 8]]


def test_the_memory_estimate_and_the_plan_count_what_each_part_creates():
    from tfdlrm.parallel.plan import plan_for
    from tfdlrm.training.memory import estimate_training_memory

    full = get_preset("kaggle", dense_norm="none")
    qr = full.replace(qr_collisions=60)
    md = full.replace(table_rows=(10_000,) + (1_000_000,) * 25, md_temperature=0.5, md_threshold=0)
    # kaggle: 26 tables of 1M rows; QR 60: 16,667 + 60 rows a table; MD: 10k rows keep 16, 1M rows get 2
    assert estimate_training_memory("dlrm", qr, "adagrad").slots == 26 * (16_667 + 60) * 16 * 4
    assert estimate_training_memory("dlrm", md, "adagrad").slots == (10_000 * 16 + 25 * 1_000_000 * 2) * 4
    ratio = estimate_training_memory("dlrm", full).tables / estimate_training_memory("dlrm", qr).tables
    assert ratio == pytest.approx(1_000_000 / (16_667 + 60), rel=1e-6)
    plan = plan_for(md, 2)
    names = [t.name for t in plan.tables]
    assert names[:3] == ["C1", "C2", "projection_C2"] and len(names) == 1 + 25 * 2
    assert sum(plan.bytes_per_device().values()) == (10_000 * 16 + 25 * (1_000_000 * 2 + 2 * 16)) * 4
    assert plan.feature_homes() == [plan.tables[0].home] + [plan.table(f"C{i}").home for i in range(2, 27)]


def test_a_memory_budget_puts_qr_on_as_few_of_the_largest_tables_as_fit():
    config = get_preset("kaggle", dense_norm="none").replace(table_rows=(1_000, 1_000_000, 50, 500_000, 100_000))
    row = 16 * 4

    def kinds(budget, **more):
        specs = table_specs(config.replace(memory_budget=budget, **more))
        return [s.kind for s in specs], sum(s.bytes for s in specs)

    assert kinds(1_601_050 * row) == (["full"] * 5, 1_601_050 * row)  # full tables fit
    # 60 MB: QR on the 1M-row table alone (250,000 + 4 rows) is enough
    assert kinds(60_000_000) == (["full", "qr", "full", "full", "full"], (1_000 + 250_004 + 50 + 500_000 + 100_000) * row)
    # 30 MB: the 1M, 500k and 100k tables (QR on the first two takes 30.5 MB)
    assert kinds(30_000_000)[0] == ["full", "qr", "full", "qr", "qr"]
    assert kinds(30_000_000, qr_collisions=60)[0] == ["full", "qr", "full", "qr", "full"]
    with pytest.raises(UserError, match=r"--memory-budget 1,000,000 bytes cannot hold the tables: QR with 4 "
                                        r"collisions on every table of more than 200 rows still takes"):
        table_specs(config.replace(memory_budget=1_000_000))
    # the model is built with the chosen tables, and counts what the choice says
    small = small_config(memory_budget=21_000)
    assert [s.kind for s in table_specs(small)][:4] == ["qr", "full", "qr", "full"]
    assert build_model("dlrm", small).count_params() == parameter_count("dlrm", small)
    # concat: every vector is 2 x dim whether the budget picks QR or not, as the config's vector_dim says
    (x, _), = batches(small_config(), n=4, count=1)
    for budget in (21_000 * 2, 10 ** 9):
        wide = small_config(memory_budget=budget, qr_operation="concat", bottom_mlp=(13, 32, 16))
        assert {s.dim for s in table_specs(wide)} == {wide.vector_dim} == {16}
        assert build_model("dlrm", wide)(x).shape == (4, 1)


def test_the_references_side_by_side_runs_get_its_own_qr_and_md_flags():
    from tfdlrm.bench.reference import reference_table_flags

    config = get_preset("kaggle", dense_norm="none")
    assert reference_table_flags(config) == []
    assert reference_table_flags(config.replace(qr_collisions=60, qr_operation="add")) == [
        "--qr-flag", "--qr-collisions=60", "--qr-operation=add", "--qr-threshold=200"]
    assert reference_table_flags(config.replace(md_temperature=0.3, md_threshold=0)) == [
        "--md-flag", "--md-temperature=0.3", "--md-threshold=0"]
    with pytest.raises(UserError, match="--md-threshold 0"):  # where the reference's --md-flag crashes
        reference_table_flags(config.replace(md_temperature=0.3))
    with pytest.raises(UserError, match="no --memory-budget"):
        reference_table_flags(config.replace(memory_budget=10 ** 9))
