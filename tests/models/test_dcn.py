import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfdlrm.baselines.dcn import DCN
from tfdlrm.layers.cross import CrossV1, CrossV2Stack
from tfdlrm.presets import get_preset


def test_cross_v1_matches_numpy():
    layer = CrossV1(num_layers=3)
    x0 = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    layer.build(tf.TensorShape([None, 7]))
    for w, b in zip(layer.kernels, layer.biases):  # non-zero biases make the test meaningful
        b.assign(np.random.default_rng(1).normal(size=7).astype(np.float32))
    out = layer(x0).numpy()
    x = x0.astype(np.float64)
    for w, b in zip(layer.kernels, layer.biases):
        x = x0 * (x @ w.numpy().ravel())[:, None] + b.numpy() + x
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
    assert layer.count_params() == 3 * 2 * 7


def test_cross_v2_stack_equals_tfrs_layers_applied_in_turn():
    stack = CrossV2Stack(num_layers=2, low_rank=3)
    x0 = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    out = stack(x0).numpy()
    x = x0
    reference = []
    for layer in stack.cross_layers:
        clone = tfrs.layers.dcn.Cross(projection_dim=3)
        clone(x0, x)
        clone.set_weights(layer.get_weights())
        reference.append(clone)
        x = clone(x0, x)
    np.testing.assert_allclose(out, x.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cross, low_rank", [("v1", None), ("v2", None), ("v2", 4)])
def test_dcn_parameter_count_is_closed_form(cross, low_rank):
    config = get_preset("tiny", rows=30, cross_low_rank=low_rank)
    model = DCN(config, cross=cross).build_from_config()
    assert model.count_params() == DCN.parameter_count(config, cross)


def test_dcn_default_is_the_papers_six_layers_and_512_256():
    config = get_preset("kaggle", rows=10)
    assert config.cross_layers == 6 and config.deep_mlp == (512, 256)
    model = DCN(config).build_from_config()
    assert len(model.cross_net.kernels) == 6
    assert [d.units for d in model.deep_net.dense_layers] == [512, 256]


def test_dcn_forward_equals_numpy():
    config = get_preset("tiny", rows=30)
    model = DCN(config).build_from_config()
    rng = np.random.default_rng(3)
    x = {"dense": rng.random((3, 13)).astype(np.float32), "sparse": rng.integers(0, 30, (3, 26))}
    tables = [t.numpy() for t in model.sparse_arch.tables]
    emb = np.concatenate([tables[f][x["sparse"][:, f]] for f in range(26)], axis=1)
    x0 = np.concatenate([x["dense"], emb], axis=1).astype(np.float64)
    cross = x0
    for w, b in zip(model.cross_net.kernels, model.cross_net.biases):
        cross = x0 * (cross @ w.numpy())  + b.numpy() + cross
    deep = x0
    for d in model.deep_net.dense_layers:
        w, b = (v.numpy() for v in d.weights)
        deep = np.maximum(deep @ w + b, 0)
    w, b = (v.numpy() for v in model.logit_layer.weights)
    logit = np.concatenate([cross, deep], axis=1) @ w + b
    np.testing.assert_allclose(model(x).numpy(), 1 / (1 + np.exp(-logit)), rtol=1e-4, atol=1e-6)


def test_bad_cross_kind():
    with pytest.raises(ValueError, match="cross must be one of"):
        DCN(get_preset("tiny"), cross="v3")
