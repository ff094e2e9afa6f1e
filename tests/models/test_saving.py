"""Saving and loading DLRM and DCN (``.keras`` and SavedModel), and their public parts:
``embedding_variables`` / ``dense_variables`` and the named sub-layers (docs/training.md)."""
import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.baselines.dcn import DCN
from tfdlrm.models.dlrm import DLRM
from tfdlrm.presets import get_preset
from tfdlrm.training.compile import build_model, compile_model

MODELS = ("dlrm", "dcn", "dcn-v2")
ROWS = [50 + i for i in range(26)]  # a different row count per table: shapes are checked per table
DENSE_MEAN = np.linspace(0.5, 3.0, 13)
DENSE_VARIANCE = np.linspace(0.25, 4.0, 13)


def _batch(seed, n=16):
    rng = np.random.default_rng(seed)
    sparse = np.stack([rng.integers(0, rows, n) for rows in ROWS], axis=1).astype(np.int64)
    return {"dense": rng.random((n, 13), np.float32) * 4, "sparse": sparse}


@pytest.fixture(scope="module", params=MODELS)
def trained(request):
    """(model name, a model trained two steps, a fixed batch, its predictions)."""
    tf.keras.utils.set_random_seed(7)
    model = build_model(request.param, get_preset("tiny").with_rows(ROWS))
    if request.param != "dlrm":
        model.dense_norm.set_statistics(DENSE_MEAN, DENSE_VARIANCE)
    compile_model(model, "adagrad", 0.05, xla="off")  # the stock step: no XLA compile time
    x = _batch(0)
    y = np.random.default_rng(1).integers(0, 2, (16, 1)).astype(np.float32)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    fixed = _batch(2)
    return request.param, model, fixed, model.predict(fixed, verbose=0)


def _assert_same_model(model, loaded, fixed, expected):
    assert type(loaded) is type(model)
    assert loaded.config == model.config and loaded.get_config() == model.get_config()
    for ours, theirs in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    # The same weights through the same ops on one CPU thread pool: bit-identical.
    np.testing.assert_array_equal(loaded.predict(fixed, verbose=0), expected)


def _one_step(model):
    before = [v.numpy() for v in model.trainable_variables]
    y = np.ones((8, 1), np.float32)
    model.fit(_batch(3, 8), y, batch_size=8, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) >= 1
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def test_keras_file_round_trip(trained, tmp_path):
    name, model, fixed, expected = trained
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = tf.keras.models.load_model(path)  # no custom_objects: DLRM and DCN are registered
    _assert_same_model(model, loaded, fixed, expected)
    if name != "dlrm":  # the standardisation statistics are weights, saved with the rest
        np.testing.assert_allclose(loaded.dense_norm.mean.numpy(), DENSE_MEAN, rtol=1e-6)
        np.testing.assert_allclose(loaded.dense_norm.variance.numpy(), DENSE_VARIANCE, rtol=1e-6)
    # A .keras file keeps no compile state (RecommenderModel.get_compile_config): compile again
    # (once with the default fast step, which XLA compiles: a few seconds).
    assert loaded.optimizer is None
    compile_model(loaded, "adagrad", 0.05, xla="sparse" if name == "dlrm" else "off")
    _one_step(loaded)


def test_saved_model_round_trip(trained, tmp_path):
    name, model, fixed, expected = trained
    path = tmp_path / "saved"
    model.save(path, save_format="tf")
    loaded = tf.keras.models.load_model(path)
    _assert_same_model(model, loaded, fixed, expected)
    # Keras compiles a SavedModel on loading (same optimizer and hyper-parameters, new
    # optimizer state, Keras's stock step); compile_model gives back the fast step.
    assert isinstance(loaded.optimizer, tf.keras.optimizers.legacy.Adagrad) and loaded.fast_step is None
    _one_step(loaded)

    restored = tf.saved_model.load(str(path))  # no Python classes needed
    inputs = {"dense": tf.constant(fixed["dense"]), "sparse": tf.constant(fixed["sparse"])}
    np.testing.assert_array_equal(restored(inputs).numpy(), expected)
    # The serving signature is traced afresh, and grappler's remapper fuses its MatMul + BiasAdd
    # (+ ReLU) into oneDNN kernels that round differently: a float32 ulp or two.
    served = restored.signatures["serving_default"](**inputs)
    np.testing.assert_allclose(next(iter(served.values())).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_model_with_an_embedding_optimizer_saves(tmp_path):
    """TFRS's CompositeOptimizer cannot be serialised: the .keras file leaves compile state out,
    a SavedModel needs ``include_optimizer=False``."""
    model = build_model("dlrm", get_preset("tiny").with_rows(ROWS))
    compile_model(model, "sgd", 0.1, embedding_optimizer=tf.keras.optimizers.legacy.Adagrad(0.05), xla="off")
    _one_step(model)
    fixed = _batch(2)
    expected = model.predict(fixed, verbose=0)
    model.save(tmp_path / "m.keras")
    _assert_same_model(model, tf.keras.models.load_model(tmp_path / "m.keras"), fixed, expected)
    model.save(tmp_path / "saved", save_format="tf", include_optimizer=False)
    _assert_same_model(model, tf.keras.models.load_model(tmp_path / "saved"), fixed, expected)


def test_embedding_and_dense_variables_partition_the_trainable_ones(trained):
    _, model, _, _ = trained
    embedding, dense = model.embedding_variables, model.dense_variables
    every = {v.ref() for v in model.trainable_variables}
    assert {v.ref() for v in embedding} | {v.ref() for v in dense} == every
    assert not {v.ref() for v in embedding} & {v.ref() for v in dense}
    assert len(embedding) + len(dense) == len(model.trainable_variables)
    # One table per categorical feature, [rows_f, dim], in feature order: sparse_arch's tables.
    assert [tuple(v.shape) for v in embedding] == [(rows, 8) for rows in ROWS]
    assert [v.ref() for v in embedding] == [t.ref() for t in model.sparse_arch.tables]
    # Non-trainable weights (DCN's standardisation statistics) are in neither.
    frozen = {v.ref() for v in model.non_trainable_variables}
    assert not frozen & every


def test_named_parts_and_their_shapes(trained):
    name, model, fixed, _ = trained
    config, batch = model.config, len(fixed["dense"])
    dense = tf.constant(fixed["dense"])
    embedded = model.sparse_arch(tf.constant(fixed["sparse"]))
    assert embedded.shape == (batch, 26, 8)
    if name == "dlrm":
        assert isinstance(model, DLRM)
        parts = ("sparse_arch", "dense_arch", "interaction_arch", "over_arch")
        bottom = model.dense_arch(dense)
        assert bottom.shape == (batch, 8)
        interacted = model.interaction_arch(bottom, embedded)
        assert interacted.shape == (batch, 8 + 26 * 27 // 2)
        assert model.over_arch(interacted).shape == (batch, 1)
    else:
        assert isinstance(model, DCN)
        parts = ("sparse_arch", "dense_norm", "cross_net", "deep_net", "logit_layer")
        x0 = tf.concat([model.dense_norm(dense), tf.reshape(embedded, [batch, -1])], axis=1)
        assert x0.shape == (batch, 13 + 26 * 8)
        crossed = model.cross_net(x0)
        assert crossed.shape == x0.shape
        deep = model.deep_net(x0)
        assert deep.shape == (batch, config.deep_mlp[-1])
        assert model.logit_layer(tf.concat([crossed, deep], axis=1)).shape == (batch, 1)
    for attribute in parts:
        layer = getattr(model, attribute)
        assert isinstance(layer, tf.keras.layers.Layer) and layer in model.layers
    assert [getattr(model, a).name for a in parts] == [a.replace("_layer", "") for a in parts]
