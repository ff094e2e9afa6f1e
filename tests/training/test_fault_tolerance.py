"""Fault tolerance: a killed run resumes where it stopped and ends where an uninterrupted
run ends; checkpoints are atomic; the same seed gives the same weights; NaN stops cleanly.

In-process tests simulate a crash by raising from the checkpoint store; the subprocess
tests SIGKILL a real ``train`` (``--deterministic``) and rerun the same command.
"""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, assert_clean_error, run_cli
from tests.helpers.cli import run_main
from tests.helpers.runs import assert_same_run, assert_same_tensors
from tests.helpers.runs import checkpoint_tensors as tensors
from tfdlrm.errors import UserError
from tfdlrm.training.checkpoints import CheckpointStore
from tfdlrm.training.loop import train
from tfdlrm.training.rundir import load_run
from tfdlrm.training.spec import TrainSpec
from tfdlrm.training.stream import pass_seed

# 20 steps an epoch, 2 epochs, a checkpoint every 7 steps: step-7, step-14, epoch-001 (20),
# step-21 ... epoch-002 (40).
# xla="off" in process (the compiled step's compilation would be most of each run's time);
# the command-line runs below (CLI_RUN: same seed, SIGKILL and resume) keep the default step.
SETTINGS = dict(preset="tiny", train_examples=10240, eval_examples=2048, batch_size=512, epochs=2,
                optimizer="adagrad", lr=0.05, checkpoint_every=7, curve_points=4, verbose=0, xla="off")


def make_spec(out, **changes) -> TrainSpec:
    return TrainSpec(**{**SETTINGS, "out": str(out), **changes})


class Crash(Exception):
    """Stands for the process dying."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(make_spec(out), log=lambda s: None)
    tf.keras.backend.clear_session()
    return out


def crash_after_saving(monkeypatch, name: str) -> None:
    original = CheckpointStore.save

    def save(self, model, checkpoint, record):
        saved = original(self, model, checkpoint, record)
        if checkpoint == name:
            raise Crash(checkpoint)
        return saved

    monkeypatch.setattr(CheckpointStore, "save", save)


def crash_while_saving(monkeypatch, name: str) -> None:
    """The process dies once TensorFlow has written ``name``'s files, before its record."""
    original = CheckpointStore.save

    def save(self, model, checkpoint, record):
        if checkpoint == name:
            tf.train.Checkpoint(root=model).write(str(self.dir / checkpoint))
            raise Crash(checkpoint)
        return original(self, model, checkpoint, record)

    monkeypatch.setattr(CheckpointStore, "save", save)


def resume(out) -> list[str]:
    lines: list[str] = []
    train(make_spec(out), log=lines.append)
    return lines


def test_a_run_crashed_mid_epoch_resumes_and_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    crash_after_saving(monkeypatch, "step-00000007")
    with pytest.raises(Crash):
        train(make_spec(out), log=lambda s: None)
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    record = json.loads((out / "checkpoints" / "step-00000007.json").read_text())
    assert (record["kind"], record["step"], record["epoch"], record["batch"]) == ("step", 7, 0, 7)
    assert record["data"] == {"position": 7, "batches_per_pass": 20, "pass": 0, "offset": 7, "seed": 1,
                              "shuffle": "once", "pass_seed": pass_seed(1, 0)}
    assert set(record["metrics"]) == {"loss", "auc", "logloss", "accuracy"}
    assert record["model"] == "dlrm" and set(record["state"]) == {"clock", "curve", "epochs", "tensorboard"}
    assert sorted(record["files"]) == ["step-00000007.data-00000-of-00001", "step-00000007.index"]
    tf.keras.backend.clear_session()
    lines = resume(out)
    assert any("resuming from" in line and "step-00000007" in line and "after batch 7" in line for line in lines)
    assert_same_run(uninterrupted, out)  # the epoch's running metrics and the curve continue exactly
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == [{"checkpoint": "step-00000007", "step": 7}]
    assert len(metrics["history"]["loss"]) == 2 and len(metrics["curve"]) == 4
    # step checkpoints before the last epoch end are pruned; the index names the newest
    names = sorted(p.name for p in (out / "checkpoints").glob("*.json"))
    assert names == ["epoch-001.json", "epoch-002.json"]
    assert tf.train.latest_checkpoint(str(out / "checkpoints")).endswith("epoch-002")


def test_torn_and_damaged_checkpoints_are_passed_over_for_the_one_before(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    crash_while_saving(monkeypatch, "epoch-001")  # killed while saving: files written, no record
    with pytest.raises(Crash):
        train(make_spec(out), log=lambda s: None)
    monkeypatch.undo()
    data = next((out / "checkpoints").glob("epoch-001.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # and torn
    assert CheckpointStore(out / "checkpoints").latest()["name"] == "step-00000014"
    assert tf.train.latest_checkpoint(str(out / "checkpoints")).endswith("step-00000014")
    # step-14 is complete but its data damaged afterwards (same size): TensorFlow's checksums catch it
    data = next((out / "checkpoints").glob("step-00000014.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64 - i for i in range(64))
    data.write_bytes(bytes(raw))
    tf.keras.backend.clear_session()
    lines = resume(out)
    assert any("step-00000014" in line and "cannot be restored" in line for line in lines), lines
    assert any("resuming from" in line and "step-00000007" in line and "epoch-001" in line for line in lines), lines
    assert_same_run(uninterrupted, out)


def test_resuming_on_converted_criteo_data_across_passes(tmp_path, monkeypatch):
    """Shuffled shards, interleaving and row windows of the reader; epochs of 7 steps over
    passes of 16 batches, so the crash (step 18) is in the second pass and the third epoch."""
    from tests.helpers.criteo_rows import numbered_lines, write_lines
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    train_file = write_lines(tmp_path / "train.txt", numbered_lines(2000))
    test_file = write_lines(tmp_path / "test.txt", numbered_lines(400, start=2000))
    convert(ConvertSpec(out=str(tmp_path / "data"), train=[str(train_file)], test=[str(test_file)],
                        hash_buckets=200, rows_per_block=64, rows_per_shard=500, progress=False), log=lambda s: None)
    settings = dict(data=str(tmp_path / "data"), batch_size=128, epochs=3, steps_per_epoch=7, checkpoint_every=3,
                    curve_points=0)
    train(make_spec(tmp_path / "uninterrupted", **settings), log=lambda s: None)
    tf.keras.backend.clear_session()
    out = tmp_path / "crashed"
    crash_after_saving(monkeypatch, "step-00000018")
    with pytest.raises(Crash):
        train(make_spec(out, **settings), log=lambda s: None)
    monkeypatch.undo()
    tf.keras.backend.clear_session()
    train(make_spec(out, **settings), log=lambda s: None)
    record = json.loads((out / "checkpoints" / "epoch-003.json").read_text())
    assert record["extra"]["resumed_from"] == [{"checkpoint": "step-00000018", "step": 18}]
    assert_same_tensors(tensors(tmp_path / "uninterrupted" / "checkpoints" / "epoch-003"),
                        tensors(out / "checkpoints" / "epoch-003"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "uninterrupted", out))
    assert a["evaluation"] == b["evaluation"] and a["history"] == b["history"]


def test_the_store_counts_only_complete_checkpoints(tmp_path):
    from tfdlrm.presets import get_preset
    from tfdlrm.training.compile import build_model, compile_model

    model = compile_model(build_model("dlrm", get_preset("tiny", rows=50)), "adagrad", 0.1)
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3, 4):
        store.save(model, f"step-{step:08d}", {"kind": "step", "step": step, "epoch": 0, "batch": step})
    good, bad = store.scan()
    assert [r["name"] for r in good] == ["step-00000003", "step-00000004"] and not bad  # the newest two kept
    (tmp_path / "step-00000004.json").unlink()  # killed before its record: not a checkpoint
    (tmp_path / "step-00000009_temp").mkdir()  # killed inside TensorFlow's write
    good, bad = store.scan()
    assert [r["name"] for r in good] == ["step-00000003"] and bad == ["step-00000004", "step-00000009"]
    store.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "step-00000003.data-00000-of-00001", "step-00000003.index", "step-00000003.json"]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("step-00000003")


def test_a_finished_run_is_not_trained_again_more_epochs_continue_it_restart_discards_it(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    lines: list[str] = []
    result = train(make_spec(out), log=lines.append)
    assert any("finished earlier" in line for line in lines) and len(lines) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before
    assert result.evaluation.auc == json.loads((out / "metrics.json").read_text())["evaluation"]["auc"]

    tf.keras.backend.clear_session()
    lines = []
    result = train(make_spec(out, epochs=3), log=lines.append)
    assert any("resuming from" in line and "epoch-002" in line for line in lines), lines
    first_two = json.loads((uninterrupted / "metrics.json").read_text())
    assert {k: v[:2] for k, v in result.history.items()} == first_two["history"] and len(result.history["loss"]) == 3
    assert result.curve[:4] == first_two["curve"] and [p["step"] for p in result.curve[4:]] == [50, 60]
    assert (out / "checkpoints" / "epoch-003.json").is_file()
    assert json.loads((out / "run.json").read_text())["spec"]["epochs"] == 3

    tf.keras.backend.clear_session()
    train(make_spec(out, epochs=1, checkpoint_every=None, restart=True), log=lambda s: None)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["epoch-001.json"]
    assert len(json.loads((out / "metrics.json").read_text())["history"]["loss"]) == 1


def test_a_checkpoint_of_other_settings_is_refused_naming_the_difference(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "metrics.json").unlink()  # an unfinished run: the checkpoints would be resumed
    for changes, fragment in [({"model": "dcn"}, "model: dlrm != dcn"), ({"rows": 500}, "table_rows differ"),
                              ({"optimizer": "sgd"}, "optimizer: 'adagrad' != 'sgd'"),
                              ({"batch_size": 256}, "batch_size: 512 != 256"),
                              ({"overrides": {"embedding_dim": 4, "bottom_mlp": (13, 32, 4)}}, "embedding_dim: 8 != 4"),
                              ({"data_seed": 5}, "data data_seed: 0 != 5"),
                              ({"epochs": 1}, "more than --epochs 1")]:
        with pytest.raises(UserError, match="--restart") as error:
            train(make_spec(out, **changes), log=lambda s: None)
        assert fragment in str(error.value)


def test_a_diverging_run_stops_at_the_step_and_never_checkpoints_nan(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "dcn", "--optimizer", "sgd", "--lr", "1e4", "--train-examples", "4096",
            "--eval-examples", "1024", "--batch-size", "256", "--checkpoint-every", "1", "--out", str(out)]
    for attempt in range(2):  # rerunning resumes from the last good checkpoint and diverges again
        proc = run_main(args)
        assert_clean_error(proc, "training diverged", "at step", "last good checkpoint:", str(out / "checkpoints"))
        assert not (out / "metrics.json").exists()
    store = CheckpointStore(out / "checkpoints")
    good, bad = store.scan()
    assert good and not bad
    for record in good:
        assert all(np.all(np.isfinite(t)) for t in tensors(store.prefix(record)).values() if t.dtype.kind == "f")
    model, _ = load_run(str(out))  # what an export would read
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# -- real processes: SIGKILL and rerun, and two runs of one seed ---------------------------------------------------------
CLI_RUN = ["train", "--train-examples", "10240", "--eval-examples", "2048", "--batch-size", "512", "--epochs", "2",
           "--optimizer", "adagrad", "--lr", "0.05", "--checkpoint-every", "7", "--seed", "3", "--deterministic"]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "reference"
    proc = run_cli(*CLI_RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_same_seed_gives_bit_identical_weights(tmp_path, cli_reference):
    out = tmp_path / "again"
    proc = run_cli(*CLI_RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(cli_reference, out)


@pytest.mark.slow
def test_a_sigkilled_train_resumes_from_its_last_checkpoint_and_ends_identical(tmp_path, cli_reference):
    import os

    out = tmp_path / "killed"
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "tfdlrm", *CLI_RUN, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "step-00000007.json"
    give_up = time.monotonic() + 600  # not a timing assertion: only a guard against a hang
    while not first.exists() and proc.poll() is None and time.monotonic() < give_up:
        time.sleep(0.02)
    proc.kill()  # SIGKILL, mid-epoch 1, just after its first checkpoint
    proc.wait()
    assert first.exists() and proc.returncode == -9
    assert not (out / "metrics.json").exists()

    again = run_cli(*CLI_RUN, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step-000000" in again.stdout, again.stdout[-2000:]
    assert_same_run(cli_reference, out)
    resumed = json.loads((out / "metrics.json").read_text())["resumed_from"]
    assert len(resumed) == 1 and resumed[0]["step"] % 7 == 0 and 0 < resumed[0]["step"] < 20  # mid-epoch 1
