"""The learning-rate schedule of MLPerf's DLRM reference (tfdlrm/training/schedule.py): its value at
every step against the reference's scheduler stepped as the reference's training loop steps it;
the rate each optimizer (and the tables' own optimizer) applies at a step; serialisation; a run
killed mid-schedule ends bit for bit as an uninterrupted one; settings and refusals."""
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main
from tests.training.test_fault_tolerance import (
    Crash,
    assert_same_tensors,
    crash_after_saving,
    tensors,
)
from tfdlrm.errors import UserError
from tfdlrm.presets import get_preset
from tfdlrm.training.compile import build_model, compile_model
from tfdlrm.training.loop import train
from tfdlrm.training.schedule import LRPolicySchedule, scheduled_lr
from tfdlrm.training.spec import TrainSpec


class ReferencePolicy:
    """facebookresearch/dlrm's ``LRPolicyScheduler`` (dlrm_s_pytorch.py) over PyTorch's
    ``_LRScheduler`` bookkeeping, in plain Python: the constructor steps once (``_step_count``
    1), and the training loop steps it after every ``optimizer.step()``.  ``rates(steps)`` are
    the rates of optimizer steps 0 .. steps-1."""

    def __init__(self, base_lr, num_warmup_steps, decay_start_step, num_decay_steps):
        self.base_lrs = [base_lr]
        self.num_warmup_steps = num_warmup_steps
        self.decay_start_step = decay_start_step
        self.decay_end_step = decay_start_step + num_decay_steps
        self.num_decay_steps = num_decay_steps
        assert self.decay_start_step >= self.num_warmup_steps  # the reference exits otherwise
        self._step_count = 0
        self.step()

    def step(self):
        self._step_count += 1
        self.lr = self.get_lr()[0]

    def get_lr(self):
        step_count = self._step_count
        if step_count < self.num_warmup_steps:
            scale = 1.0 - (self.num_warmup_steps - step_count) / self.num_warmup_steps
            lr = [base_lr * scale for base_lr in self.base_lrs]
            self.last_lr = lr
        elif self.decay_start_step <= step_count and step_count < self.decay_end_step:
            decayed_steps = step_count - self.decay_start_step
            scale = ((self.num_decay_steps - decayed_steps) / self.num_decay_steps) ** 2
            min_lr = 0.0000001
            lr = [max(min_lr, base_lr * scale) for base_lr in self.base_lrs]
            self.last_lr = lr
        else:
            if self.num_decay_steps > 0:
                lr = self.last_lr
            else:
                lr = self.base_lrs
        return lr

    def rates(self, steps: int) -> np.ndarray:
        out = []
        for _ in range(steps):
            out.append(self.lr)  # what optimizer.step() uses
            self.step()
        return np.array(out)


def reference_rates(lr, warmup, start, decay, steps) -> np.ndarray:
    return ReferencePolicy(lr, warmup, start, decay).rates(steps)


@pytest.mark.parametrize("lr,warmup,start,decay,steps", [
    (0.5, 4, 10, 6, 30),        # warmup, the held last warmup rate, decay, the held last decay rate
    (0.5, 4, 4, 6, 20),         # the decay straight after the warmup
    (2.0, 7, 7, 0, 20),         # warmup only: lr from the warmup's end on
    (0.1, 0, 0, 5, 12),         # decay only, from the first step (the reference's decay start 0)
    (1e-6, 3, 5, 8, 20),        # the decay's floor, 1e-7
    (18.0, 8000, 70000, 30000, 110000),  # MLPerf DLRM runs of the reference (Terabyte, batch 32768)
])
def test_the_rate_at_every_step_is_the_references(lr, warmup, start, decay, steps):
    expected = reference_rates(lr, warmup, start, decay, steps)
    schedule = LRPolicySchedule(lr, warmup, start, decay)
    got = schedule(tf.range(steps, dtype=tf.int64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    # as the optimizers evaluate it: the step counter cast to float32, the rate to the variables' dtype
    as_applied = tf.cast(schedule(tf.cast(tf.range(steps), tf.float32)), tf.float32).numpy()
    np.testing.assert_array_equal(as_applied, expected.astype(np.float32))


def test_without_a_warmup_step_the_rate_before_the_decay_is_the_base_rate():
    # The reference reads an unset last rate there (an AttributeError); the base rate is the rate it means.
    schedule = LRPolicySchedule(0.3, warmup_steps=1, decay_start_step=5, decay_steps=4)
    got = schedule(tf.range(12)).numpy()
    n = np.arange(1, 13)
    expected = np.where(n < 5, 0.3, np.maximum(1e-7, 0.3 * ((4 - (np.minimum(n, 8) - 5)) / 4) ** 2))
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    assert scheduled_lr(0.3) == 0.3 and scheduled_lr(None, 5, None, 3) is None  # no schedule: the number itself
    assert scheduled_lr(0.3, 5, None, 3).get_config()["decay_start_step"] == 5  # the decay follows the warmup


def test_the_schedule_is_serialisable_and_survives_an_optimizer_round_trip():
    schedule = LRPolicySchedule(0.4, 3, 6, 5)
    again = tf.keras.optimizers.schedules.deserialize(tf.keras.optimizers.schedules.serialize(schedule))
    assert isinstance(again, LRPolicySchedule) and again.get_config() == schedule.get_config()
    optimizer = tf.keras.optimizers.legacy.SGD(learning_rate=schedule)
    rebuilt = tf.keras.optimizers.legacy.SGD.from_config(json.loads(json.dumps(optimizer.get_config())))
    steps = tf.range(15)
    np.testing.assert_array_equal(rebuilt.learning_rate(steps).numpy(), schedule(steps).numpy())


def _reset(model, step: int) -> None:
    """Fresh optimizer state (zero slots) at optimizer step ``step``."""
    optimizer = model.optimizer
    for v in optimizer.variables():
        v.assign(tf.zeros_like(v))
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        opt.iterations.assign(step)


def _one_step_updates(compile_args: dict, compile_unit: dict, steps) -> list:
    """For each step k: (the update of every variable under ``compile_args`` at step k, the same
    update under ``compile_unit`` (rate 1) at step k), from the same weights, batch and optimizer state."""
    config = get_preset("tiny", rows=50)
    scheduled, unit = build_model("dlrm", config), build_model("dlrm", config)
    unit.set_weights(scheduled.get_weights())
    compile_model(scheduled, **compile_args)
    compile_model(unit, **compile_unit)
    rng = np.random.default_rng(0)
    x = {"dense": rng.random((64, 13), np.float32), "sparse": rng.integers(0, 50, (64, 26))}
    y = (rng.random((64, 1)) < 0.3).astype(np.float32)
    start = scheduled.get_weights()
    out = []
    for k in steps:
        deltas = []
        for model in (scheduled, unit):
            model.set_weights(start)
            _reset(model, k)
            model.train_on_batch(x, y)
            deltas.append([w0 - w1 for w0, w1 in zip(start, model.get_weights())])
        out.append(deltas)
    names = [v.name for v in scheduled.weights]
    return names, start, out


def _assert_scaled(delta, unit_delta, rate, start) -> None:
    """``delta`` = ``rate`` x ``unit_delta`` up to float32 rounding of the weights (w - u)."""
    atol = 4 * float(np.spacing(np.float32(np.abs(start).max() + np.abs(unit_delta).max())))
    np.testing.assert_allclose(delta, rate * unit_delta, rtol=2e-6, atol=atol)


RATE, WARMUP, START, DECAY = 0.5, 4, 6, 4
STEPS = (0, 2, 4, 6, 7, 11)  # warmup, warmup, held, decay start, decay, after the decay


@pytest.mark.parametrize("optimizer,xla", [("sgd", "sparse"), ("sgd", "full"), ("sgd", "off"),
                                           ("adagrad", "sparse"), ("adam", "sparse")])
def test_each_step_applies_the_scheduled_rate(optimizer, xla):
    """The fast step (and Keras's) reads the rate at the optimizer's step: an update at step k is
    the reference's rate at k times the update at rate 1 (SGD: lr(k) x gradient; Adagrad and Adam
    from the same state scale the same way)."""
    schedule = LRPolicySchedule(RATE, WARMUP, START, DECAY)
    expected = reference_rates(RATE, WARMUP, START, DECAY, max(STEPS) + 1).astype(np.float32)
    names, start, updates = _one_step_updates({"optimizer": optimizer, "lr": schedule, "xla": xla},
                                              {"optimizer": optimizer, "lr": 1.0, "xla": xla}, STEPS)
    for k, (delta, unit_delta) in zip(STEPS, updates):
        assert any(np.abs(u).max() > 0 for u in unit_delta)
        for name, w, d, u in zip(names, start, delta, unit_delta):
            _assert_scaled(d, u, expected[k], w)


def test_the_tables_follow_their_own_schedule():
    """--embedding-optimizer/--embedding-lr: the tables' rate is the schedule of the embedding lr, the
    other weights' that of lr, each at its own optimizer's step."""
    dense, tables = LRPolicySchedule(0.5, WARMUP, START, DECAY), LRPolicySchedule(0.05, WARMUP, START, DECAY)
    expected_dense = reference_rates(0.5, WARMUP, START, DECAY, max(STEPS) + 1).astype(np.float32)
    expected_tables = reference_rates(0.05, WARMUP, START, DECAY, max(STEPS) + 1).astype(np.float32)
    names, start, updates = _one_step_updates(
        {"optimizer": "sgd", "lr": dense, "embedding_optimizer": "adagrad", "embedding_lr": tables},
        {"optimizer": "sgd", "lr": 1.0, "embedding_optimizer": "adagrad", "embedding_lr": 1.0}, STEPS)
    assert sum("embedding" in n or "table" in n for n in names) == 26, names
    for k, (delta, unit_delta) in zip(STEPS, updates):
        for name, w, d, u in zip(names, start, delta, unit_delta):
            table = "embedding" in name or "table" in name
            _assert_scaled(d, u, (expected_tables if table else expected_dense)[k], w)


# 20 steps an epoch, 2 epochs, a checkpoint every 7 steps (test_fault_tolerance.py's run), with the
# schedule: warmup to step 8, the last warmup rate held to step 12, decay over 20 steps, then held.
SETTINGS = dict(preset="tiny", train_examples=10240, eval_examples=2048, batch_size=512, epochs=2,
                optimizer="adagrad", lr=0.05, embedding_optimizer="sgd", embedding_lr=0.5, checkpoint_every=7,
                curve_points=4, verbose=0, xla="off", warmup_steps=8, decay_start_step=12, decay_steps=20)


def make_spec(out, **changes) -> TrainSpec:
    return TrainSpec(**{**SETTINGS, "out": str(out), **changes})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("scheduled") / "run"
    train(make_spec(out), log=lambda s: None)
    tf.keras.backend.clear_session()
    return out


def test_a_run_killed_mid_schedule_resumes_bit_identical(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    crash_after_saving(monkeypatch, "step-00000021")  # in the decay, in the second epoch
    with pytest.raises(Crash):
        train(make_spec(out), log=lambda s: None)
    monkeypatch.undo()
    tf.keras.backend.clear_session()
    lines: list[str] = []
    train(make_spec(out), log=lines.append)
    assert any("resuming from" in line and "step-00000021" in line for line in lines), lines
    assert_same_tensors(tensors(uninterrupted / "checkpoints" / "epoch-002"), tensors(out / "checkpoints" / "epoch-002"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (uninterrupted, out))
    for key in ("evaluation", "history", "curve", "epochs"):
        assert a[key] == b[key], key
    # history's learning rates: each epoch's last step (19, 39), the reference's, per optimizer
    dense = reference_rates(0.05, 8, 12, 20, 40)
    tables = reference_rates(0.5, 8, 12, 20, 40)
    np.testing.assert_allclose(b["history"]["lr"], [dense[19], dense[39]], rtol=1e-15)
    np.testing.assert_allclose(b["history"]["embedding_lr"], [tables[19], tables[39]], rtol=1e-15)
    step = tensors(out / "checkpoints" / "epoch-002")
    assert sorted(int(v) for k, v in step.items() if "iter" in k) == [40, 40]  # both optimizers' steps


def test_a_resumed_run_with_other_schedule_flags_is_refused(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "metrics.json").unlink()  # unfinished: its checkpoints would be resumed
    for changes, fragment in [({"warmup_steps": 6}, "warmup_steps: 8 != 6"),
                              ({"decay_start_step": 14}, "decay_start_step: 12 != 14"),
                              ({"decay_steps": 10}, "decay_steps: 20 != 10")]:
        with pytest.raises(UserError, match="--restart") as error:
            train(make_spec(out, **changes), log=lambda s: None)
        assert fragment in str(error.value)


@pytest.mark.parametrize("flags,fragments", [
    (["--decay-start-step", "3"], ["--decay-start-step 3 needs --decay-steps"]),
    (["--warmup-steps", "5", "--decay-steps", "3", "--decay-start-step", "2"],
     ["--decay-start-step 2 is before the warmup ends", "--warmup-steps 5"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", "integer >= 0"]),
    (["--decay-steps", "x"], ["--decay-steps", "'x'"]),
])
def test_bad_schedule_flags_are_one_line(flags, fragments):
    assert_clean_error(run_main(["train", *flags]), *fragments)
