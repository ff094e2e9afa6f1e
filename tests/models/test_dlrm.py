import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.baselines.dcn import DCN
from tfdlrm.errors import UserError
from tfdlrm.models.dlrm import DLRM
from tfdlrm.presets import DENSE_NORMS, PRESET_NAMES, ModelConfig, get_preset
from tfdlrm.training.rundir import settings_differences


def relu(x):
    return np.maximum(x, 0)


def numpy_mlp(layer, x, final_relu):
    weights = [[v.numpy().astype(np.float64) for v in d.weights] for d in layer.dense_layers]
    for i, (w, b) in enumerate(weights):
        x = x @ w + b
        if i < len(weights) - 1 or final_relu:
            x = relu(x)
    return x


def batch(config, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": rng.random((n, config.num_dense)).astype(np.float32),
        "sparse": np.stack([rng.integers(0, r, n) for r in config.table_rows], axis=1).astype(np.int64),
    }


@pytest.fixture
def config():
    return get_preset("tiny", rows=50)


def test_dlrm_forward_equals_numpy_composition(config):
    model = DLRM(config).build_from_config()
    x = batch(config)
    tables = [t.numpy().astype(np.float64) for t in model.sparse_arch.tables]
    emb = np.stack([tables[f][x["sparse"][:, f]] for f in range(config.num_tables)], axis=1)
    bottom = numpy_mlp(model.dense_arch, x["dense"].astype(np.float64), final_relu=True)
    vectors = np.concatenate([bottom[:, None], emb], axis=1)
    gram = np.einsum("bid,bjd->bij", vectors, vectors)
    n = vectors.shape[1]
    pairs = np.stack([gram[:, i, j] for i in range(n) for j in range(i)], axis=1)
    logit = numpy_mlp(model.over_arch, np.concatenate([bottom, pairs], axis=1), final_relu=False)
    expected = 1 / (1 + np.exp(-logit))
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.logits(x).numpy(), logit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("dense_norm", DENSE_NORMS)
def test_parameter_count_is_closed_form(preset, dense_norm):
    config = get_preset(preset, rows=20, dense_norm=dense_norm)
    model = DLRM(config).build_from_config()
    assert model.count_params() == DLRM.parameter_count(config)
    assert (model.dense_norm is None) == (dense_norm == "none")


@pytest.mark.parametrize("model_class", [DLRM, DCN])
def test_standardised_model_equals_the_raw_model_on_standardised_inputs(config, model_class):
    """--dense-norm standardize is (x - mean) / sqrt(variance + 1e-6) before the first layer, and
    nothing else: the same weights without it, given those values computed in numpy, predict the same."""
    ours = model_class(config).build_from_config()
    raw = model_class(config.replace(dense_norm="none")).build_from_config()
    x = batch(config, n=32)
    rng = np.random.default_rng(3)
    mean, variance = rng.normal(size=13), rng.uniform(0.1, 4.0, size=13)
    ours.dense_norm.set_statistics(mean, variance)
    statistics = {id(ours.dense_norm.mean), id(ours.dense_norm.variance)}
    raw.set_weights([w.numpy() for w in ours.weights if id(w) not in statistics])
    standardised = ((x["dense"].astype(np.float64) - mean) / np.sqrt(variance + 1e-6)).astype(np.float32)
    expected = raw({"dense": standardised, "sparse": x["sparse"]}).numpy()
    np.testing.assert_allclose(ours(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(raw(x).numpy(), expected, atol=1e-3)  # the statistics matter here


def test_dense_norm_in_the_config_and_from_runs_saved_before_it(config):
    saved = config.to_dict()
    assert saved["dense_norm"] == "standardize"  # the default, every model
    del saved["dense_norm"]
    assert ModelConfig.from_dict(saved, "dlrm").dense_norm == "none"  # DLRM took raw values before
    assert ModelConfig.from_dict(saved, "dcn").dense_norm == "standardize"
    with pytest.raises(UserError, match="dense_norm must be one of standardize, none"):
        config.replace(dense_norm="minmax")
    rebuilt = DLRM.from_config({"config": saved, "name": "dlrm"})
    assert rebuilt.config.dense_norm == "none" and rebuilt.dense_norm is None
    # a DLRM run saved before the option is not resumed as a standardised one
    asked = {"model": "dlrm", "config": config.to_dict()}
    assert "dense_norm: none != standardize (--dense-norm none continues it)" in settings_differences(
        {"model": "dlrm", "config": saved}, asked)
    assert not [d for d in settings_differences({"model": "dcn", "config": saved}, {**asked, "model": "dcn"})
                if "dense_norm" in d]


def test_paper_kaggle_parameter_count_by_hand():
    config = get_preset("kaggle", rows=1000)
    bottom = 13 * 512 + 512 + 512 * 256 + 256 + 256 * 64 + 64 + 64 * 16 + 16
    top_in = 16 + 27 * 26 // 2  # 367, as the reference's arch-mlp-top adjustment
    top = top_in * 512 + 512 + 512 * 256 + 256 + 256 + 1
    assert DLRM.parameter_count(config.replace(dense_norm="none")) == 26 * 1000 * 16 + bottom + top
    # standardised: a mean and a variance per dense feature more, not trained
    assert DLRM.parameter_count(config) == 26 * 1000 * 16 + bottom + top + 2 * 13


def test_cat_interaction_and_self_interaction_models_count(config):
    for overrides in ({"interaction": "cat"}, {"self_interaction": True}):
        c = config.replace(**overrides)
        model = DLRM(c).build_from_config()
        assert model.count_params() == DLRM.parameter_count(c)


def test_multi_hot_bags(config):
    c = config.replace(ids_per_lookup=3)
    model = DLRM(c).build_from_config()
    rng = np.random.default_rng(0)
    x = {"dense": rng.random((4, 13)).astype(np.float32), "sparse": rng.integers(0, 50, (4, 26, 3))}
    assert model(x).shape == (4, 1)
    ragged = tf.RaggedTensor.from_uniform_row_length(
        tf.RaggedTensor.from_row_lengths(tf.constant(x["sparse"].reshape(-1)), [3] * (4 * 26)), 26)
    np.testing.assert_allclose(model({"dense": x["dense"], "sparse": ragged}).numpy(), model(x).numpy(), rtol=1e-5)


def test_summary_names_the_parts(config):
    lines = []
    DLRM(config).build_from_config().summary(print_fn=lines.append)
    text = "\n".join(lines)
    for part in ("sparse_arch", "dense_arch", "interaction_arch", "over_arch", "(None, 26, 8)"):
        assert part in text
    assert f"Total params: {DLRM.parameter_count(config)} (" in text


def test_get_config_round_trip_rebuilds_same_predictions(config):
    model = DLRM(config).build_from_config()
    clone = DLRM.from_config(model.get_config()).build_from_config()
    clone.set_weights(model.get_weights())
    x = batch(config)
    np.testing.assert_array_equal(clone(x).numpy(), model(x).numpy())
    assert clone.config == model.config


def test_bad_inputs_have_clear_errors(config):
    model = DLRM(config).build_from_config()
    x = batch(config)
    with pytest.raises(ValueError, match=r"expects a dict"):
        model(x["dense"])
    with pytest.raises(ValueError, match=r"dense features of shape \[batch, 13\]"):
        model({"dense": x["dense"][:, :12], "sparse": x["sparse"]})
    with pytest.raises(ValueError, match=r"ids for 26 categorical features, got 25"):
        model({"dense": x["dense"], "sparse": x["sparse"][:, :25]})
    bad = x["sparse"].copy()
    bad[0, 3] = 50
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature C4 .* got id 50"):
        model({"dense": x["dense"], "sparse": bad})


def test_dcn_shares_the_embedding_layer_type(config):
    dcn = DCN(config).build_from_config()
    assert type(dcn.sparse_arch) is type(DLRM(config).sparse_arch)
