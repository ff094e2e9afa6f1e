"""TensorBoard summaries (every --log-every steps, the exact metrics at every evaluation, hparams,
one step axis across a resumed run), progress lines, --quiet, and no per-step host sync."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.cli import run_main
from tests.helpers.summaries import hparams_in, read_events
from tfdlrm.errors import TrainingDiverged, UserError
from tfdlrm.training.callbacks import StopOnNonFinite
from tfdlrm.training.loop import train
from tfdlrm.training.progress import Progress, format_duration
from tfdlrm.training.reporting import drop_events_after
from tfdlrm.training.spec import TrainSpec

# 20 steps an epoch, 2 epochs; scalars every 5 steps, a curve point every 10, a checkpoint every 7.
SETTINGS = dict(preset="tiny", train_examples=10240, eval_examples=2048, batch_size=512, epochs=2,
                optimizer="adagrad", lr=0.05, checkpoint_every=7, curve_points=4, log_every=5, verbose=0, xla="off")


def make_spec(out, **changes) -> TrainSpec:
    return TrainSpec(**{**SETTINGS, "out": str(out), **changes})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("board") / "run"
    train(make_spec(out), log=lambda s: None)
    tf.keras.backend.clear_session()
    return out


def test_scalars_every_n_steps_exact_metrics_at_every_evaluation_and_hparams(uninterrupted):
    events = read_events(uninterrupted / "logs")
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    for tag in ("train/loss", "train/learning_rate", "train/examples_per_second"):
        assert [s for s, _ in events[tag]] == list(range(5, 41, 5)), tag
    assert all(v == pytest.approx(0.05) for _, v in events["train/learning_rate"])
    assert all(v > 0 for _, v in events["train/examples_per_second"])
    # the interval means of an epoch average to its mean loss (equal batches)
    for epoch, end in ((0, 20), (1, 40)):
        interval = [v for s, v in events["train/loss"] if end - 20 < s <= end]
        assert np.mean(interval) == pytest.approx(metrics["history"]["loss"][epoch], rel=1e-5)
    # the exact held-out metrics of each epoch end, at its step
    for split in ("val", "test"):
        for name in ("auc", "logloss", "accuracy"):
            expected = [(e["step"], e[split][name]) for e in metrics["epochs"]]
            assert [(s, pytest.approx(v, rel=1e-6)) for s, v in events[f"{split}/{name}"]] == expected
    assert [s for s, _ in events["epoch/loss"]] == [20, 40]
    # the learning-curve points, exact, at theirs
    for name in ("auc", "logloss", "accuracy"):
        expected = [(p["step"], pytest.approx(p[f"eval_{name}"], rel=1e-6)) for p in metrics["curve"]]
        assert events[f"curve/{name}"] == expected and len(expected) == 4
    hparams = hparams_in(events)
    assert hparams["model"] == "dlrm" and hparams["optimizer"] == "adagrad" and hparams["batch_size"] == 512
    assert hparams["lr"] == pytest.approx(0.05) and hparams["epochs"] == 2 and hparams["bottom_mlp"] == "13-32-8"
    assert "out" not in hparams and "verbose" not in hparams
    assert not (uninterrupted / "logs" / "train").exists()  # no Keras TensorBoard callback beside it


class Crash(Exception):
    """Stands for the process dying."""


def test_a_resumed_run_continues_the_same_step_axis(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    original = StopOnNonFinite.on_train_batch_end

    def crash_at_step_13(self, batch, logs=None):
        original(self, batch, logs)
        if self.step == 13:  # past step-7's checkpoint and step 10's scalars
            raise Crash()

    monkeypatch.setattr(StopOnNonFinite, "on_train_batch_end", crash_at_step_13)
    with pytest.raises(Crash):
        train(make_spec(out), log=lambda s: None)
    monkeypatch.undo()
    assert [s for s, _ in read_events(out / "logs")["train/loss"]] == [5, 10]
    tf.keras.backend.clear_session()
    train(make_spec(out), log=lambda s: None)  # resumes from step-00000007

    resumed, reference = read_events(out / "logs"), read_events(uninterrupted / "logs")
    assert len(list((out / "logs").glob("events.out.tfevents*"))) == 2  # one file per process
    assert resumed.keys() == reference.keys()
    for tag in reference:
        steps = [s for s, _ in resumed[tag]]
        assert steps == [s for s, _ in reference[tag]], tag  # no step twice, none missing, in order
        if tag not in ("train/examples_per_second", "_hparams_/session_start_info"):
            assert resumed[tag] == reference[tag], tag  # the loss of the interval across the resume too


def test_dropping_events_after_a_step_keeps_the_rest_byte_for_byte(tmp_path):
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        for step in range(1, 11):
            tf.summary.scalar("x", step * 0.5, step=step)
    path, = tmp_path.glob("events.out.tfevents*")
    path.write_bytes(path.read_bytes()[:-7])  # the last record cut short, as by a kill
    assert drop_events_after(tmp_path, 6) == 3  # 7, 8, 9 (10 was cut short)
    assert read_events(tmp_path)["x"] == [(s, s * 0.5) for s in range(1, 7)]
    assert drop_events_after(tmp_path, 6) == 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


class Tripwire:
    """A loss that counts how often it is read (a tensor read waits for its step)."""

    def __init__(self, value):
        self.value, self.reads = value, 0

    def __float__(self):
        self.reads += 1
        return float(self.value)


class FakeClock:
    def __init__(self):
        self.seconds = 0.0

    def state(self):
        return {"seconds": self.seconds}


def test_progress_lines_every_tenth_of_an_epoch_read_the_loss_only_then():
    lines, clock = [], FakeClock()
    progress = Progress(epochs=3, steps_per_epoch=781, batch_size=128, clock=clock, write=lines.append)
    progress.on_epoch_begin(0)
    loss = Tripwire(0.4521)
    for batch in range(781):
        clock.seconds += 0.01
        progress.on_train_batch_end(batch, {"loss": loss})
    progress.on_epoch_end(0, {"loss": 0.45, "val_auc": 0.75, "val_logloss": 0.46, "val_accuracy": 0.78,
                              "test_auc": 0.74, "test_logloss": 0.47, "test_accuracy": 0.77})
    assert len(lines) == 10 and loss.reads == 9
    assert lines[3] == "epoch 1/3   40%  step 316/781  loss 0.4521  12,800 examples/s  eta 0:05"
    assert lines[-1].startswith("epoch 1/3  done in ") and "val: auc 0.7500  logloss 0.4600  accuracy 0.7800" in lines[-1]
    assert "test: auc 0.7400" in lines[-1] and "12,800 examples/s" in lines[-1]
    assert not any("\r" in line or "\b" in line for line in lines)


def test_progress_lines_every_30_seconds_in_long_epochs(monkeypatch):
    import tfdlrm.training.progress as progress_module

    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    lines = []
    progress = Progress(epochs=1, steps_per_epoch=10_000, batch_size=128, clock=FakeClock(), write=lines.append)
    progress.on_epoch_begin(0)
    for batch in range(250):
        now[0] += 1.0  # a second a step: a tenth of the epoch would take 1,000 s
        progress.on_train_batch_end(batch, {"loss": 0.5})
    assert [line.split("step ")[1].split()[0] for line in lines] == ["30/10,000", "60/10,000", "90/10,000",
                                                                     "120/10,000", "150/10,000", "180/10,000",
                                                                     "210/10,000", "240/10,000"]
    assert format_duration(3723) == "1:02:03" and format_duration(42) == "0:42"


def test_the_nan_check_reads_every_n_steps_and_names_the_first_bad_step():
    stop = StopOnNonFinite(first_step=100, every=5)
    stop.on_epoch_begin(0)
    losses = [tf.constant(v) for v in (0.5, 0.4, float("nan"), float("nan"), float("nan"))]
    for batch, loss in enumerate(losses[:4]):
        stop.on_train_batch_end(batch, {"loss": loss})  # steps 101-104: not read yet
    with pytest.raises(TrainingDiverged, match="at step 103 "):
        stop.on_train_batch_end(4, {"loss": losses[4]})  # step 105: read, and the first NaN named


def test_fit_converts_no_step_logs_and_plain_progress_goes_to_the_log(tmp_path, monkeypatch):
    """Every batch-level callback takes the step's tensors unread: Keras converts none of the 40
    steps' logs (a host sync each) in its batch hooks."""
    from tf_keras.src import callbacks as keras_callbacks
    from tf_keras.src.utils import tf_utils

    in_batch_hook, converted = [False], []
    original_sync, original_hook = tf_utils.sync_to_numpy_or_python_type, keras_callbacks.CallbackList.on_train_batch_end

    def sync(x):
        converted.append(in_batch_hook[0] and isinstance(x, dict) and "loss" in x)  # a step's logs
        return original_sync(x)

    def batch_end(self, batch, logs=None):
        in_batch_hook[0] = True
        try:
            return original_hook(self, batch, logs)
        finally:
            in_batch_hook[0] = False

    monkeypatch.setattr(tf_utils, "sync_to_numpy_or_python_type", sync)
    monkeypatch.setattr(keras_callbacks.CallbackList, "on_train_batch_end", batch_end)
    lines = []
    train(make_spec(tmp_path / "run", verbose="auto"), log=lines.append)  # pytest's stdout: not a terminal
    assert converted and not any(converted)  # epoch ends convert (and evaluations); no step's logs
    progress = [line for line in lines if line.startswith("epoch ")]
    assert [line.split("step ")[1].split()[0] for line in progress if "step " in line] == \
        [f"{n}/20" for n in range(2, 20, 2)] * 2
    assert sum(" done in " in line for line in progress) == 2


def test_quiet_prints_no_progress_but_the_results():
    args = ["train", "--train-examples", "4096", "--eval-examples", "1024", "--batch-size", "512", "--xla", "off",
            "--steps-per-execution", "4"]  # callbacks at steps 4 and 8 (auto: 8, one call an epoch)
    loud, quiet = run_main(args), run_main(args + ["--quiet"])
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "epoch 1/1   50%  step 4/8  loss " in loud.stdout and "\r" not in loud.stdout and "\b" not in loud.stdout
    assert "held-out: exact AUC" in quiet.stdout and "epoch 1/1" not in quiet.stdout


def test_bad_log_every_is_one_line():
    with pytest.raises(UserError, match="--log-every must be a positive number of steps, got 0"):
        TrainSpec(log_every=0).check()
    proc = run_main(["train", "--log-every", "0"])
    assert proc.returncode == 2 and "--log-every: expected a positive integer, got '0'" in proc.stderr
