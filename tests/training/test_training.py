import json

import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import get_preset
from tfdlrm.training.compile import build_model, compile_model
from tfdlrm.training.evaluate import evaluate
from tfdlrm.training.loop import train
from tfdlrm.training.rundir import load_run
from tfdlrm.training.spec import TrainSpec


def one_batch(config, ids_in_use, n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = {"dense": rng.random((n, config.num_dense)).astype(np.float32),
         "sparse": rng.choice(ids_in_use, size=(n, config.num_tables)).astype(np.int64)}
    return x, rng.integers(0, 2, (n, 1)).astype(np.float32)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_step_changes_only_the_looked_up_rows(optimizer):
    config = get_preset("tiny", rows=5000)
    model = build_model("dlrm", config)
    compile_model(model, optimizer, 0.5, metrics=False)
    used = np.array([3, 17, 4999])
    x, y = one_batch(config, used)
    before = [t.numpy() for t in model.sparse_arch.tables]
    model.train_on_batch(x, y)
    for f, (old, table) in enumerate(zip(before, model.sparse_arch.tables)):
        changed = np.flatnonzero(np.any(old != table.numpy(), axis=1))
        assert set(changed) <= set(x["sparse"][:, f]) and len(changed) > 0


def test_sgd_has_no_slots_and_applies_sparse_updates():
    config = get_preset("tiny", rows=5000)
    model = build_model("dlrm", config)
    compile_model(model, "sgd", 0.1, metrics=False)
    x, y = one_batch(config, np.arange(10))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = model.compiled_loss(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))

    ops = [op.type for op in step.get_concrete_function(x, y).graph.get_operations()]
    assert ops.count("ResourceScatterAdd") == config.num_tables
    dense_variables = len(model.trainable_variables) - config.num_tables
    assert ops.count("ResourceApplyGradientDescent") == dense_variables
    step(x, y)
    table_shapes = {tuple(t.shape) for t in model.sparse_arch.tables}
    assert not [v for v in model.optimizer.variables() if tuple(v.shape) in table_shapes]


def test_composite_optimizer_gives_tables_their_own_optimizer():
    config = get_preset("tiny", rows=200)
    model = build_model("dlrm", config)
    compile_model(model, "sgd", 0.1, embedding_optimizer="adagrad", embedding_lr=0.05, metrics=False)
    x, y = one_batch(config, np.arange(200))
    model.train_on_batch(x, y)
    opts = model.optimizer.optimizers
    assert [type(o).__name__ for o in opts] == ["Adagrad", "SGD"]
    slot_shapes = {tuple(v.shape) for v in opts[0].variables()}
    assert (200, 8) in slot_shapes  # Adagrad accumulators for the tables
    assert not opts[1].variables()[1:]  # SGD: only its iteration counter


def test_training_on_synthetic_data_learns_toward_the_teacher(tmp_path):
    spec = TrainSpec(model="dlrm", preset="tiny", data="synthetic", epochs=1, batch_size=256,
                     optimizer="adagrad", lr=0.05, train_examples=75_000, eval_examples=30_000,
                     out=str(tmp_path / "run"), verbose=0)
    result = train(spec, log=lambda s: None)
    auc = result.evaluation.auc
    assert auc > 0.65, auc
    assert auc < result.teacher_auc
    assert result.examples_per_second > 0 and result.params == build_model("dlrm", get_preset("tiny")).count_params()
    # The run directory rebuilds the model without the command line.
    model, meta = load_run(str(tmp_path / "run"))
    assert meta["model"] == "dlrm" and meta["config"]["preset"] == "tiny"
    from tfdlrm.pipelines.sources import open_data

    data = open_data("synthetic", get_preset("tiny"), train_examples=75_000, eval_examples=30_000)
    again = evaluate(model, data.eval_dataset(4096))
    assert again.auc == pytest.approx(auc, abs=1e-6)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["evaluation"]["auc"] == pytest.approx(auc)
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents*"))  # TensorBoard (test_logging.py)


# DCN with Keras's stock step: test_dcn_uses_the_fast_step_too (tests/models) checks its fast step against
# that one; DCN-v2's fast step is trained here only, so it keeps the default
@pytest.mark.parametrize("model_name, xla", [("dcn", "off"), ("dcn-v2", "auto")])
def test_dcn_trains(model_name, xla):
    result = train(TrainSpec(model=model_name, preset="tiny", data="synthetic", batch_size=512, optimizer="adagrad",
                             lr=0.05, train_examples=60_000, eval_examples=10_240, verbose=0, xla=xla),
                   log=lambda s: None)
    assert result.evaluation.auc > 0.6


def test_random_multi_hot_data_trains_through_fit():
    spec = TrainSpec(model="dlrm", preset="tiny", data="random", rows=300, overrides={"ids_per_lookup": 3},
                     batch_size=64, train_examples=640, eval_examples=256, verbose=0)
    result = train(spec, log=lambda s: None)
    assert 0.3 < result.evaluation.auc < 0.7  # random labels: nothing to learn


def test_bad_specs_are_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        train(TrainSpec(model="dnn"))
    with pytest.raises(UserError, match="learning rate"):
        train(TrainSpec(lr=-1.0))
    with pytest.raises(UserError, match="unknown optimizer"):
        train(TrainSpec(optimizer="rmsprop"))
    with pytest.raises(UserError, match="unknown preset"):
        train(TrainSpec(preset="huge"))
    with pytest.raises(UserError, match="not a training run"):
        load_run("/nonexistent/run")
