"""Several training steps a call of Keras's train function (``train``'s steps_per_execution)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.runs import checkpoint_tensors
from tests.helpers.summaries import read_events
from tfdlrm.errors import UserError
from tfdlrm.training.checkpoints import CheckpointStore
from tfdlrm.training.loop import train
from tfdlrm.training.spec import TrainSpec
from tfdlrm.training.stream import crossed, steps_per_execution

# 16 steps an epoch (or 18), 2 epochs; scalars every 4 steps, a checkpoint every 8, 4 curve points.
SETTINGS = dict(preset="tiny", train_examples=8192, eval_examples=2048, batch_size=512, epochs=2,
                optimizer="adagrad", lr=0.05, checkpoint_every=8, curve_points=4, log_every=4, verbose=0, xla="off")


def test_steps_a_call_divide_the_event_intervals():
    assert steps_per_execution(128, 100) == 25  # about 4096 examples a call, at most 32, dividing 100
    assert steps_per_execution(128) == 32 and steps_per_execution(64) == 32
    assert steps_per_execution(512, 4, 8) == 4 and steps_per_execution(512, 100, 7) == 1
    assert steps_per_execution(2048, 100) == 2 and steps_per_execution(4096, 100) == 1
    assert steps_per_execution(65536) == 1
    assert steps_per_execution(128, 100, asked=3) == 3
    assert crossed(3, 4, 4) and crossed(2, 9, 4) and not crossed(4, 7, 4) and not crossed(3, 9, None)


def run(out, **changes):
    spec = TrainSpec(**{**SETTINGS, "out": str(out), **changes})
    lines = []
    result = train(spec, log=lines.append)
    tf.keras.backend.clear_session()
    weights = CheckpointStore(out / "checkpoints").scan()[0]
    return result, lines, read_events(out / "logs"), json.loads((out / "metrics.json").read_text()), weights


@pytest.fixture(scope="module")
def one_step_a_call(tmp_path_factory):
    out = tmp_path_factory.mktemp("spe") / "one"
    return out, run(out, steps_per_execution=1)


def test_four_steps_a_call_train_the_same_weights_with_the_same_events(one_step_a_call, tmp_path):
    one_out, (one, one_lines, one_events, one_metrics, one_saved) = one_step_a_call
    out = tmp_path / "four"
    four, lines, events, metrics, saved = run(out)  # auto: 4 (a divisor of --log-every 4, --checkpoint-every 8)
    assert any("4 steps a call" in line for line in lines)
    assert any("1 steps a call" in line for line in one_lines)
    a, b = (checkpoint_tensors(d / "checkpoints" / "epoch-002") for d in (one_out, out))
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert four.evaluation.auc == one.evaluation.auc
    assert sorted(r["name"] for r in saved) == sorted(r["name"] for r in one_saved)
    assert [s for s, _ in events["train/loss"]] == [s for s, _ in one_events["train/loss"]] == list(range(4, 33, 4))
    for (s, v), (s1, v1) in zip(events["train/loss"], one_events["train/loss"]):
        assert v == pytest.approx(v1, rel=1e-6)
    assert [p["step"] for p in metrics["curve"]] == [p["step"] for p in one_metrics["curve"]]
    assert [p["eval_auc"] for p in metrics["curve"]] == pytest.approx([p["eval_auc"] for p in one_metrics["curve"]])


def test_events_between_call_ends_happen_at_the_next_one(one_step_a_call, tmp_path):
    """18 steps an epoch with 4 a call: a call ends at each epoch end (steps 18 and 36), so the
    second epoch's calls end at 22, 26, ...; scalars due at 20, 24, ... come at those ends."""
    out = tmp_path / "eighteen"
    result, _, events, metrics, saved = run(out, train_examples=9216)
    assert [s for s, _ in events["train/loss"]] == [4, 8, 12, 16, 22, 26, 30, 34, 36]
    # a point every 36 // 4 = 9 steps, rounded down to whole calls (8), and one at each epoch end
    assert [p["step"] for p in metrics["curve"]] == [8, 16, 18, 26, 34, 36]
    assert result.examples == 2 * 9216


def test_bad_steps_per_execution_is_one_line():
    with pytest.raises(UserError, match="--steps-per-execution must be a positive number"):
        TrainSpec(steps_per_execution=0).check()
