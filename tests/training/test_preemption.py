"""SIGTERM and SIGINT while training: a checkpoint at the current step, one line, exit status 128 +
the signal, and a rerun that resumes and ends bit-identical to an uninterrupted run; a second
signal ends the process at once."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from tests.helpers import REPO, run_cli
from tests.helpers.runs import SAME_RUN_KEYS
from tests.helpers.runs import assert_same_run as same_run
from tests.helpers.summaries import read_events
from tfdlrm.errors import Stopped
from tfdlrm.training.callbacks import StopOnNonFinite
from tfdlrm.training.loop import train
from tfdlrm.training.spec import TrainSpec

# 20 steps an epoch, 2 epochs, a checkpoint every 7 steps.
SETTINGS = dict(preset="tiny", train_examples=10240, eval_examples=2048, batch_size=512, epochs=2,
                optimizer="adagrad", lr=0.05, checkpoint_every=7, curve_points=4, log_every=5, verbose=0, xla="off")


def make_spec(out, **changes) -> TrainSpec:
    return TrainSpec(**{**SETTINGS, "out": str(out), **changes})


def assert_same_run(a_dir, b_dir) -> None:
    """Same final checkpoint, bit for bit, and the same metrics.json apart from timings and resumes."""
    same_run(a_dir, b_dir, keys=SAME_RUN_KEYS + ("epochs",))


def assert_same_summaries(a_logs, b_logs) -> None:
    a, b = read_events(a_logs), read_events(b_logs)
    assert a.keys() == b.keys()
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        if tag not in ("train/examples_per_second", "_hparams_/session_start_info"):
            assert a[tag] == b[tag], tag


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt") / "run"
    train(make_spec(out), log=lambda s: None)
    tf.keras.backend.clear_session()
    return out


def signal_at_step(monkeypatch, number: int, step: int) -> None:
    """The process receives ``number`` just after step ``step`` (from a callback that runs before
    the stop's, as a signal between two steps would)."""
    original = StopOnNonFinite.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        before = self.step
        original(self, batch, logs)
        if before < step <= self.step:  # at the end of the call of the train function that ran the step
            os.kill(os.getpid(), number)

    monkeypatch.setattr(StopOnNonFinite, "on_train_batch_end", on_train_batch_end)


@pytest.mark.parametrize("step, checkpoint", [(12, "step-00000012"), (20, "epoch-001")])
def test_sigint_checkpoints_the_step_and_the_rerun_ends_identical(tmp_path, monkeypatch, uninterrupted, step,
                                                                   checkpoint):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_at_step(monkeypatch, signal.SIGINT, step)
    with pytest.raises(Stopped) as stopped:
        train(make_spec(out), log=lambda s: None)
    monkeypatch.undo()
    prefix = out / "checkpoints" / checkpoint
    assert str(stopped.value) == f"stopped by SIGINT at step {step}; checkpoint {prefix} written; rerun the same " \
                                 f"command to resume"
    assert stopped.value.exit_status == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the handlers put back
    record = json.loads((out / "checkpoints" / f"{checkpoint}.json").read_text())
    assert record["step"] == step and not (out / "metrics.json").exists()
    tf.keras.backend.clear_session()
    lines = []
    train(make_spec(out), log=lines.append)
    assert any("resuming from" in line and checkpoint in line for line in lines), lines
    assert_same_run(uninterrupted, out)
    assert_same_summaries(uninterrupted / "logs", out / "logs")


@pytest.mark.parametrize("per_call, stopped_at", [(1, 3), (None, 5)])
def test_without_a_run_directory_nothing_is_saved(monkeypatch, per_call, stopped_at):
    """The stop comes at the end of the call of the train function the signal came in: with the
    default of 5 steps a call here (dividing --log-every 5), at step 5."""
    before = signal.getsignal(signal.SIGTERM)
    signal_at_step(monkeypatch, signal.SIGTERM, 3)
    with pytest.raises(Stopped, match=rf"^stopped by SIGTERM at step {stopped_at}; nothing saved "
                                      r"\(no run directory, --out\)$") as e:
        train(TrainSpec(**{**SETTINGS, "checkpoint_every": None, "steps_per_execution": per_call}), log=lambda s: None)
    assert e.value.exit_status == 143 and signal.getsignal(signal.SIGTERM) == before


# -- real processes: SIGTERM, the rerun, and a second signal ----------------------------------------------------------
CLI_RUN = ["train", "--train-examples", "10240", "--eval-examples", "2048", "--batch-size", "512", "--epochs", "2",
           "--optimizer", "adagrad", "--lr", "0.05", "--checkpoint-every", "7", "--seed", "3", "--deterministic",
           "--log-every", "5", "--xla", "off"]


def start(args, out, code=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("TF_USE_LEGACY_KERAS", None)
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "tfdlrm", *args]
    return subprocess.Popen(command + ["--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, fragment: str) -> str:
    for line in proc.stdout:  # progress lines, flushed as they come; the guard against a hang is pytest's
        if fragment in line:
            return line
    raise AssertionError(f"the process ended without printing {fragment!r}: {proc.wait()}, {proc.stderr.read()}")


@pytest.mark.slow
def test_a_sigtermed_train_exits_143_after_a_checkpoint_and_the_rerun_ends_identical(tmp_path):
    reference = tmp_path / "reference"
    proc = run_cli(*CLI_RUN, "--out", str(reference))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "stopped"
    proc = start(CLI_RUN, out)
    wait_for_line(proc, "epoch 1/2   50%  step 10/20")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM received: stopping after this step with a checkpoint" in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"stopped by SIGTERM at step (\d+); checkpoint (\S+) written; rerun the same command to "
                         r"resume", last)
    assert match and "Traceback" not in stderr, stderr[-3000:]
    step, prefix = int(match.group(1)), match.group(2)
    assert 10 <= step < 40 and json.loads(open(prefix + ".json").read())["step"] == step
    assert not (out / "metrics.json").exists()

    again = run_cli(*CLI_RUN, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {prefix}: step {step}" in again.stdout
    assert_same_run(reference, out)
    assert_same_summaries(reference / "logs", out / "logs")


# The checkpoint of a stop takes a minute here, as a large model's might: time for a second signal.
SLOW_SAVE = """
import pathlib, sys, time
import tfdlrm
from tfdlrm.training.callbacks import RunCheckpoints
original = RunCheckpoints.save_now
def save_now(self, *args, **kwargs):
    pathlib.Path(self.store.dir.parent, "saving").write_text("")
    time.sleep(60)
    return original(self, *args, **kwargs)
RunCheckpoints.save_now = save_now
from tfdlrm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_signal_while_the_checkpoint_is_written_ends_the_process_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start(CLI_RUN, out, code=SLOW_SAVE)
    wait_for_line(proc, "step 10/20")
    proc.send_signal(signal.SIGTERM)
    while not (out / "saving").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)  # a Ctrl-C after the scheduler's SIGTERM
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGINT and time.monotonic() - began < 30  # not after the 60 s save
    marked = (out / "saving").stat().st_mtime
    records = list((out / "checkpoints").glob("*.json"))
    assert records and all(p.stat().st_mtime <= marked for p in records)  # the stop's checkpoint never came
