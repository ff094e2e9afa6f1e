"""--keep N and export --checkpoint best|latest|epoch-N|step-N: the store keeps the newest N
checkpoints and the best epoch's on validation (checked after every save against an independent
choice); a run with --keep 1 ends with its last and best epochs; the export of ``best`` predicts
what ``load_run`` of that checkpoint predicts (and not what the last epoch does) and says so in
export.json; wrong names and a run without a validation split are refused in one line."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main
from tests.helpers.criteo_rows import numbered_lines, write_lines
from tfdlrm.errors import UserError
from tfdlrm.presets import get_preset
from tfdlrm.training.checkpoints import CheckpointStore
from tfdlrm.training.compile import build_model, compile_model
from tfdlrm.training.loop import train
from tfdlrm.training.rundir import load_run
from tfdlrm.training.spec import TrainSpec


def test_the_store_keeps_the_newest_n_and_the_best_epoch(tmp_path):
    model = compile_model(build_model("dlrm", get_preset("tiny", rows=50)), "sgd", 0.1)
    store = CheckpointStore(tmp_path, keep=2)
    aucs = {1: 0.70, 2: 0.74, 3: 0.72, 4: 0.74, 5: 0.71}  # epoch 2 stays the best (4 only equals it)
    entries, saved, best = [], [], None
    for epoch in range(1, 6):
        for step in (epoch * 10 - 6, epoch * 10 - 3):  # two step checkpoints inside each epoch
            saved.append((f"step-{step:08d}", step))
            store.save(model, saved[-1][0], {"kind": "step", "step": step, "epoch": epoch - 1, "batch": step % 10,
                                            "state": {"epochs": {"epochs": list(entries), "best_epoch": best}}})
            check_kept(tmp_path, saved, entries)
        entries.append({"epoch": epoch, "step": epoch * 10, "val": {"auc": aucs[epoch]}, "test": {}})
        best = max(entries, key=lambda e: (e["val"]["auc"], -e["epoch"]))["epoch"]
        saved.append((f"epoch-{epoch:03d}", epoch * 10))
        store.save(model, saved[-1][0], {"kind": "epoch", "step": epoch * 10, "epoch": epoch, "batch": 0,
                                        "state": {"epochs": {"epochs": list(entries), "best_epoch": best}}})
        check_kept(tmp_path, saved, entries)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("epoch-005")


def check_kept(directory, saved, entries) -> None:
    """Independent: the two newest saved, and the epoch of the highest validation AUC (the earliest)."""
    expected = {name for name, _ in sorted(saved, key=lambda s: s[1])[-2:]}
    if entries:
        top = max(e["val"]["auc"] for e in entries)
        expected.add(f"epoch-{min(e['epoch'] for e in entries if e['val']['auc'] == top):03d}")
    assert {p.name[:-5] for p in directory.glob("*.json")} == expected


# Random labels: the validation AUC peaks at epoch 2 of 4 (checked below), so best and latest differ.
SETTINGS = dict(preset="tiny", data="random", train_examples=2048, eval_examples=1024, batch_size=256, epochs=4,
                optimizer="sgd", lr=0.1, checkpoint_every=3, keep=1, verbose=0, xla="off",
                overrides={"dense_norm": "none"})  # raw inputs: the construction's best epoch is not the last


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("keep") / "run"
    result = train(TrainSpec(**SETTINGS, out=str(out)), log=lambda s: None)
    tf.keras.backend.clear_session()
    aucs = [e["val"]["auc"] for e in result.epochs]
    best = int(np.argmax(aucs)) + 1  # the first of the highest
    assert best == result.best_epoch and best < SETTINGS["epochs"], aucs
    return out, best


def test_keep_1_leaves_the_last_and_the_best_epoch(run):
    out, best = run
    names = sorted(p.name[:-5] for p in (out / "checkpoints").glob("*.json"))
    assert names == sorted({f"epoch-{best:03d}", "epoch-004"})
    index = (out / "checkpoints" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "epoch-004"' in index and f"epoch-{best:03d}" in index


def _features(n=256):
    rng = np.random.default_rng(7)
    return {"dense": rng.random((n, 13), np.float32) * 5, "sparse": rng.integers(0, 1000, (n, 26))}


def test_export_of_the_best_checkpoint_predicts_as_that_checkpoint(tmp_path, run):
    out, best = run
    proc = run_main(["export", str(out), "--checkpoint", "best", "--out", str(tmp_path / "models")])
    assert proc.returncode == 0, proc.stderr
    assert f"(epoch-{best:03d}, the best epoch on validation)" in proc.stdout
    version = tmp_path / "models" / "1"
    info = json.loads((version / "assets.extra" / "export.json").read_text())
    assert info["exported_checkpoint"] == {"asked": "best", "name": f"epoch-{best:03d}", "best_on_validation": True,
                                           "kind": "epoch", "step": best * 8, "epoch": best, "batch": 0}
    assert info["checkpoint"] == str((out / "checkpoints" / f"epoch-{best:03d}").resolve())
    metrics = json.loads((out / "metrics.json").read_text())
    assert info["metrics"] == metrics["epochs"][best - 1]["test"]  # that epoch's held-out metrics, not the last's

    features = _features()
    served = tf.saved_model.load(str(version)).signatures["serving_default"](
        dense=tf.constant(features["dense"]), sparse=tf.constant(features["sparse"]))["probability"].numpy()
    best_model, _ = load_run(str(out), mixed_precision=None, checkpoint="best")
    latest_model, _ = load_run(str(out), mixed_precision=None)
    np.testing.assert_allclose(served, best_model.predict_on_batch(features), atol=1e-6)
    assert np.abs(served - latest_model.predict_on_batch(features)).max() > 1e-4
    by_name, _ = load_run(str(out), mixed_precision=None, checkpoint=f"epoch-{best}")
    for a, b in zip(by_name.get_weights(), best_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unknown_or_missing_checkpoints_are_refused_listing_the_available_ones(tmp_path, run):
    out, best = run
    available = f"best (epoch {best}), latest (epoch-004), " + ", ".join(sorted({f"epoch-{best:03d}", "epoch-004"}))
    for which, fragment in [("newest", "unknown checkpoint 'newest': choose best, latest, epoch-N or step-N"),
                            ("epoch-3" if best != 3 else "epoch-1", "has no checkpoint epoch-"),
                            ("step-5", "has no checkpoint step-5")]:
        proc = run_main(["export", str(out), "--checkpoint", which, "--out", str(tmp_path / "models")])
        assert_clean_error(proc, fragment, available)
        assert not (tmp_path / "models" / "1").exists()
    with pytest.raises(UserError, match="unknown checkpoint"):
        load_run(str(out), checkpoint="epoch_2")


def test_best_needs_a_validation_split(tmp_path):
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    train_file = write_lines(tmp_path / "train.txt", numbered_lines(300))
    test_file = write_lines(tmp_path / "test.txt", numbered_lines(100, start=300))
    convert(ConvertSpec(out=str(tmp_path / "data"), train=[str(train_file)], test=[str(test_file)],
                        hash_buckets=50, rows_per_block=64, progress=False), log=lambda s: None)
    out = tmp_path / "run"
    train(TrainSpec(data=str(tmp_path / "data"), batch_size=64, verbose=0, xla="off", out=str(out)), log=lambda s: None)
    proc = run_main(["export", str(out), "--checkpoint", "best", "--out", str(tmp_path / "models")])
    assert_clean_error(proc, "--checkpoint best needs a validation split", str(out), "use latest or epoch-N")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_train_export_takes_the_best_epoch_where_there_is_a_validation_split(tmp_path):
    out = tmp_path / "run"
    proc = run_main(["train", "--train-examples", "2048", "--eval-examples", "1024", "--batch-size", "512",
                     "--epochs", "2", "--xla", "off", "--quiet", "--out", str(out), "--export", str(tmp_path / "m")])
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "m" / "1" / "assets.extra" / "export.json").read_text())
    best = json.loads((out / "metrics.json").read_text())["best_epoch"]
    assert info["exported_checkpoint"]["asked"] == "best" and info["exported_checkpoint"]["epoch"] == best
