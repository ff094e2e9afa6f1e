import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.layers.mlp import MLP
from tfdlrm.sizes import mlp_parameter_count


def test_forward_matches_numpy():
    mlp = MLP([5, 3, 2], final_activation=None)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    out = mlp(x).numpy()
    h = x.astype(np.float64)
    for i, layer in enumerate(mlp.dense_layers):
        w, b = (v.numpy() for v in layer.weights)
        h = h @ w + b
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


def test_final_relu_by_default():
    mlp = MLP([8, 4])
    out = mlp(np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)).numpy()
    assert out.min() >= 0.0


def test_reference_initialisation_statistics():
    mlp = MLP([400, 300])
    mlp.build(tf.TensorShape([None, 500]))
    (w0, b0), (w1, b1) = ([v.numpy() for v in layer.weights] for layer in mlp.dense_layers)
    assert abs(w0.std() - np.sqrt(2 / (500 + 400))) < 0.02 * np.sqrt(2 / 900)
    assert abs(w1.std() - np.sqrt(2 / (400 + 300))) < 0.02 * np.sqrt(2 / 700)
    assert abs(b0.std() - np.sqrt(1 / 400)) < 0.15 * np.sqrt(1 / 400)
    assert abs(b1.std() - np.sqrt(1 / 300)) < 0.15 * np.sqrt(1 / 300)
    assert abs(w0.mean()) < 0.01 * np.sqrt(2 / 900) * 10


def test_parameter_count_closed_form():
    mlp = MLP([512, 256, 1])
    mlp.build(tf.TensorShape([None, 367]))
    assert mlp.count_params() == mlp_parameter_count(367, [512, 256, 1]) == 367 * 512 + 512 + 512 * 256 + 256 + 257


def test_bad_widths_and_config_round_trip():
    with pytest.raises(ValueError, match="positive"):
        MLP([4, 0])
    with pytest.raises(ValueError, match="positive"):
        MLP([])
    mlp = MLP([4, 2], activation="relu", final_activation="sigmoid", name="m")
    clone = MLP.from_config(mlp.get_config())
    assert clone.get_config() == mlp.get_config()
    assert clone.final_activation == "sigmoid"
