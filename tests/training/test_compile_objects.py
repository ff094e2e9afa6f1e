"""``compile_model`` with optimizer objects as well as names (tfdlrm/training/compile.py)."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import get_preset
from tfdlrm.training import compile as compile_module
from tfdlrm.training.compile import build_model, compile_model

legacy = tf.keras.optimizers.legacy


def _model(weights=None):
    model = build_model("dlrm", get_preset("tiny").with_rows(50))
    if weights is not None:
        model.set_weights(weights)
    return model


def _batch():
    rng = np.random.default_rng(0)
    x = {"dense": rng.random((16, 13), np.float32), "sparse": rng.integers(0, 50, (16, 26))}
    return x, rng.integers(0, 2, (16, 1)).astype(np.float32)


def _train(model, steps=2):
    x, y = _batch()
    model.fit(x, y, batch_size=16 // steps, epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.weights]


def _assert_same(a, b):
    assert len(a) == len(b)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)


def test_an_sgd_object_trains_as_the_name():
    by_name = _model()
    start = by_name.get_weights()
    by_object = _model(start)
    compile_model(by_name, "sgd", 0.05, metrics=False)
    compile_model(by_object, legacy.SGD(learning_rate=0.05), metrics=False)
    after = _train(by_name)
    assert not np.array_equal(after[0], start[0])
    _assert_same(after, _train(by_object))


def test_an_embedding_optimizer_object_trains_as_the_name():
    import tensorflow_recommenders as tfrs

    by_name = _model()
    by_object = _model(by_name.get_weights())
    compile_model(by_name, "sgd", 0.1, embedding_optimizer="adagrad", embedding_lr=0.05, metrics=False)
    tables_opt = legacy.Adagrad(learning_rate=0.05, initial_accumulator_value=0.0, epsilon=1e-10)
    compile_model(by_object, "sgd", 0.1, embedding_optimizer=tables_opt, metrics=False)
    assert isinstance(by_object.optimizer, tfrs.experimental.optimizers.CompositeOptimizer)
    _assert_same(_train(by_name), _train(by_object))
    # The object's own slots hold the tables' accumulators: it updated them.
    table = by_object.embedding_variables[0]
    assert np.any(tables_opt.get_slot(table, "accumulator").numpy() > 0)


def test_names_default_to_lr_0_1():
    model = compile_model(_model(), "adagrad", metrics=False)
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(0.1)


def test_a_new_optimizer_is_accepted_with_one_warning(monkeypatch):
    monkeypatch.setattr(compile_module, "_warned_new_optimizer", False)
    model = _model()
    with pytest.warns(UserWarning, match="legacy"):
        compile_model(model, tf.keras.optimizers.SGD(learning_rate=0.05), metrics=False)
    assert model.fast_step is None  # the fast step needs a legacy optimizer: Keras's own step
    start = model.get_weights()
    after = _train(model, steps=1)
    assert not np.array_equal(after[0], start[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*non-legacy")  # a second new optimizer: no second warning
        compile_model(_model(), "sgd", 0.1, embedding_optimizer=tf.keras.optimizers.Adagrad(0.05), metrics=False)
    with pytest.raises(UserError, match="legacy"):
        compile_model(_model(), tf.keras.optimizers.SGD(0.05), xla="full")


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer=legacy.SGD(0.1), lr=0.1), "leave lr out"),
    (dict(optimizer="sgd", embedding_optimizer=legacy.Adagrad(0.1), embedding_lr=0.1), "leave embedding_lr out"),
    (dict(optimizer=legacy.SGD(0.1), embedding_lr=0.1), "give embedding_optimizer too"),
    (dict(optimizer="rmsprop"), "unknown optimizer"),
    (dict(optimizer=object()), "must be one of sgd, adagrad, adam or a tf_keras optimizer"),
    (dict(optimizer="sgd", lr=-1.0), "positive"),
])
def test_bad_optimizer_arguments(kwargs, match):
    with pytest.raises(UserError, match=match) as error:
        compile_model(_model(), **kwargs)
    assert "\n" not in str(error.value)


def test_the_same_object_for_both_is_refused():
    opt = legacy.SGD(0.1)
    with pytest.raises(UserError, match="same object"):
        compile_model(_model(), opt, embedding_optimizer=opt)


def test_a_keras3_optimizer_is_refused():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3."):
        pytest.skip(f"keras {keras3.__version__} is not Keras 3")
    for kwargs in (dict(optimizer=keras3.optimizers.SGD(0.1)),
                   dict(optimizer="sgd", embedding_optimizer=keras3.optimizers.Adagrad(0.1))):
        with pytest.raises(UserError, match="Keras 3 optimizer.*use tf.keras.optimizers"):
            compile_model(_model(), **kwargs)
