"""--early-stop PATIENCE (tfdlrm/training/early_stop.py): the decision against a Keras-style
counter of epochs without improvement; a run whose validation AUC cannot change (a rate that
moves no float32 weight) stops PATIENCE epochs after its first; a trained run stops where its
uninterrupted twin's per-epoch validation AUCs say it should, is finished (metrics.json, rerun,
more epochs), and a run killed after its stopping epoch's checkpoint finishes without training
more; data without a validation split is refused in one line."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main
from tests.helpers.criteo_rows import numbered_lines, write_lines
from tests.training.test_fault_tolerance import Crash, crash_after_saving
from tfdlrm.training.callbacks import EpochEvaluation
from tfdlrm.training.early_stop import patience_ran_out, stopped_after
from tfdlrm.training.loop import train
from tfdlrm.training.spec import TrainSpec


def counter_stop(aucs, patience, epochs):
    """Independent: the epoch a wait counter (reset on a strictly higher AUC) reaches ``patience``,
    if before ``epochs``."""
    best, wait = -np.inf, 0
    for epoch, auc in enumerate(aucs, 1):
        if auc > best:
            best, wait = auc, 0
        else:
            wait += 1
        if wait >= patience:
            return epoch if epoch < epochs else None
    return None


def decision_stop(aucs, patience, epochs):
    """The first epoch after which tfdlrm stops, fed the AUCs one epoch at a time."""
    evaluation = EpochEvaluation(None)
    for epoch, auc in enumerate(aucs, 1):
        evaluation.epochs.append({"epoch": epoch, "step": epoch * 10, "val": {"auc": auc}, "test": {}})
        evaluation.best_epoch = evaluation._best()
        if patience_ran_out(evaluation.epochs, evaluation.best_epoch, patience):
            return stopped_after(evaluation, patience, epochs)
    return stopped_after(evaluation, patience, epochs)


def test_the_decision_is_a_counter_of_epochs_without_improvement():
    rng = np.random.default_rng(3)
    checked = stops = 0
    for _ in range(300):
        n = int(rng.integers(1, 9))
        aucs = list(rng.choice([0.61, 0.62, 0.63, 0.64], size=n))  # ties: an equal AUC does not improve
        for patience in (1, 2, 3):
            expected = counter_stop(aucs, patience, epochs=n)
            assert decision_stop(aucs, patience, epochs=n) == expected, (aucs, patience)
            checked, stops = checked + 1, stops + (expected is not None)
    assert stops > 100 and checked - stops > 100  # both outcomes were exercised
    # without a validation split nothing stops
    evaluation = EpochEvaluation(None)
    evaluation.epochs = [{"epoch": e, "step": e, "test": {"auc": 0.5}} for e in (1, 2, 3)]
    evaluation.best_epoch = 3
    assert not patience_ran_out(evaluation.epochs, 1, 1) and stopped_after(evaluation, 1, 5) is None


TINY = dict(preset="tiny", data="synthetic", train_examples=2048, eval_examples=1024, batch_size=256,
            optimizer="sgd", verbose=0, xla="off")


def test_a_run_whose_validation_auc_cannot_change_stops_patience_epochs_after_the_first(tmp_path):
    # lr 1e-30: every update is below half a float32 ulp of its weight, so the weights (and the
    # validation AUC) stay as initialised; epoch 1 stays the best, and patience 2 ends epoch 3.
    out = tmp_path / "run"
    lines: list[str] = []
    result = train(TrainSpec(**TINY, lr=1e-30, epochs=6, early_stop=2, out=str(out)), log=lines.append)
    aucs = [e["val"]["auc"] for e in result.epochs]
    assert len(aucs) == 3 and len(set(aucs)) == 1
    assert (result.best_epoch, result.stopped_epoch) == (1, 3)
    assert any("early stop after epoch 3" in line and "best epoch 1" in line for line in lines), lines
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_epoch"] == 3 and len(metrics["history"]["loss"]) == 3
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == [f"epoch-00{e}.json" for e in (1, 2, 3)]


SETTINGS = dict(TINY, lr=0.1, epochs=6, overrides={"dense_norm": "none"})  # raw inputs: validation AUC peaks part way
PATIENCE = 3


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The same run without --early-stop: its per-epoch validation AUCs say where to stop."""
    result = train(TrainSpec(**SETTINGS), log=lambda s: None)
    tf.keras.backend.clear_session()
    aucs = [e["val"]["auc"] for e in result.epochs]
    expected = counter_stop(aucs, PATIENCE, SETTINGS["epochs"])
    assert expected is not None and 1 < expected < SETTINGS["epochs"], aucs  # the construction stops part way
    return result, expected


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, twin):
    out = tmp_path_factory.mktemp("early") / "run"
    lines: list[str] = []
    result = train(TrainSpec(**SETTINGS, early_stop=PATIENCE, out=str(out)), log=lines.append)
    tf.keras.backend.clear_session()
    return out, result, lines


def test_a_trained_run_stops_where_its_validation_aucs_say(twin, stopped):
    full, expected = twin
    out, result, lines = stopped
    assert result.stopped_epoch == expected
    assert result.epochs == full.epochs[:expected]  # the same run up to the stop, bit for bit
    assert result.best_epoch == expected - PATIENCE
    assert any(f"early stop after epoch {expected}" in line for line in lines), lines
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_epoch"] == expected and metrics["evaluation"] == full.epochs[expected - 1]["test"]
    assert {k: len(v) for k, v in metrics["history"].items()} == {k: expected for k in metrics["history"]}
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*.json"))[-1] == f"epoch-00{expected}.json"


def test_a_stopped_run_is_finished_even_with_more_epochs(tmp_path, stopped):
    out, result, _ = stopped
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    for epochs in (SETTINGS["epochs"], SETTINGS["epochs"] + 4):
        lines: list[str] = []
        again = train(TrainSpec(**{**SETTINGS, "epochs": epochs}, early_stop=PATIENCE, out=str(out)),
                      log=lines.append)
        assert any("finished earlier" in line and "--early-stop ended it" in line for line in lines), lines
        assert again.stopped_epoch == result.stopped_epoch and again.evaluation == result.evaluation
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def test_a_run_killed_after_its_stopping_checkpoint_finishes_without_training(tmp_path, monkeypatch, stopped):
    out_done, result, _ = stopped
    out = tmp_path / "run"
    spec = TrainSpec(**SETTINGS, early_stop=PATIENCE, out=str(out))
    crash_after_saving(monkeypatch, f"epoch-00{result.stopped_epoch}")
    with pytest.raises(Crash):
        train(spec, log=lambda s: None)
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    tf.keras.backend.clear_session()
    lines: list[str] = []
    again = train(spec, log=lines.append)
    assert any("resuming from" in line for line in lines), lines
    assert again.stopped_epoch == result.stopped_epoch
    assert not (out / "checkpoints" / f"epoch-00{result.stopped_epoch + 1}.json").exists()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out_done, out))
    for key in ("evaluation", "history", "epochs", "best_epoch", "stopped_epoch", "examples"):
        assert a[key] == b[key], key


def test_early_stop_needs_a_validation_split(tmp_path):
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    train_file = write_lines(tmp_path / "train.txt", numbered_lines(300))
    test_file = write_lines(tmp_path / "test.txt", numbered_lines(100, start=300))
    convert(ConvertSpec(out=str(tmp_path / "data"), train=[str(train_file)], test=[str(test_file)],
                        hash_buckets=50, rows_per_block=64, progress=False), log=lambda s: None)
    proc = run_main(["train", "--data", str(tmp_path / "data"), "--early-stop", "2", "--out", str(tmp_path / "run")])
    assert_clean_error(proc, "--early-stop needs a validation split", str(tmp_path / "data"))
    assert not (tmp_path / "run" / "run.json").exists()
    assert_clean_error(run_main(["train", "--early-stop", "0"]), "--early-stop", "positive integer")
