"""TensorBoard for a run directory: scalars every ``log_every`` steps, the exact held-out metrics at
every evaluation, the run's settings as hparams, on one step axis across resumed processes.

Everything goes to the run's ``logs/`` (one TensorBoard run), at the optimizer step:

    train/loss, train/learning_rate (train/embedding_learning_rate), train/examples_per_second
                    every ``log_every`` steps: the mean loss of the steps since the previous point
                    (exact: from the loss metric's sums), the rate of the last step, examples per
                    second of training time (TrainingClock: epoch-end evaluations and checkpoint
                    saves excluded)
    epoch/*         at each epoch end: Keras's running metrics of the epoch (loss, auc, ...), lr
    val/*, test/*   at each epoch end: the exact AUC, log loss and accuracy (EpochEvaluation)
    curve/*         at each learning-curve point: exact auc, logloss, accuracy on the held-out
                    split it evaluates, and the training logloss and accuracy since the last point

Steps are only read on the steps that write (a multiple of ``log_every``): a batch in between costs
a counter.  Each write is flushed before the run's next checkpoint can be taken, and a resumed run
first drops from the event files what its killed predecessor wrote after the checkpoint it resumes
from (``drop_events_after``), so that every (tag, step) appears once.  See docs/training.md,
**TensorBoard**.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import tensorflow as tf

from tfdlrm.training.stream import crossed

EVENTS = "events.out.tfevents"


def _frames(data: bytes):
    """The records of a TFRecord file as (payload, frame bytes); a record cut short ends it."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos + 12:pos + 12 + length], data[pos:end]
        pos = end


def drop_events_after(directory: Path, step: int) -> int:
    """Remove the events of steps after ``step`` (and a record cut short by a kill) from the event
    files in ``directory``, each rewritten whole through a temporary file and a rename; returns how
    many events went.  The records kept are copied byte for byte (their checksums with them)."""
    if not directory.is_dir():
        return 0
    dropped = 0
    for path in sorted(directory.glob(f"{EVENTS}*")):
        data = path.read_bytes()
        kept, seen, removed = [], 0, 0
        for payload, frame in _frames(data):
            seen += len(frame)
            try:
                event_step = tf.compat.v1.Event.FromString(payload).step
            except Exception:  # noqa: BLE001 (not an event: leave it to TensorBoard)
                event_step = 0
            if event_step > step:
                removed += 1
            else:
                kept.append(frame)
        if removed or seen != len(data):
            tmp = path.with_name(f".dropping-{os.getpid()}.tmp")
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, path)
            dropped += removed
    return dropped


def hparams_of(run_info: dict, leave_out: Optional[tuple] = None) -> dict:
    """The run's settings (run.json: model, config, spec) as TensorBoard hparams: scalars as they
    are, layer widths as ``13-512-256-64-16``, the tables as their count and total rows; ``None``,
    dicts and the keys in ``leave_out`` (default: the spec's fields that say how a run runs, not
    what it computes, but ``epochs``) are left out."""
    if leave_out is None:
        from tfdlrm.training.rundir import RESUMABLE_CHANGES

        leave_out = tuple(k for k in RESUMABLE_CHANGES if k != "epochs") + ("log_every",)
    values = {"model": run_info.get("model"), "mixed_precision": run_info.get("mixed_precision") or "off"}
    config = dict(run_info.get("config") or {})
    rows = config.pop("table_rows", None)
    if rows:
        values.update(tables=len(rows), table_rows_total=int(sum(rows)))
    values.update(config)
    values.update({k: v for k, v in (run_info.get("spec") or {}).items()
                   if k not in leave_out and k not in values and k != "mixed_precision"})
    out = {}
    for key, value in values.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            out[key] = "-".join(str(v) for v in value)
    return out


class TensorBoardLog(tf.keras.callbacks.Callback):
    """Write the run's summaries into ``logs_dir`` (see the module docstring).  Place it after the
    callbacks that add to the epoch's logs (EpochEvaluation, the learning rate) and before the
    run's checkpoints; ``curve_point`` takes LearningCurve's points (its ``on_point``).
    ``first_step`` is the optimizer step this ``fit`` starts from; ``hparams`` are written by a
    run that starts from step 0; ``batch_hooks=False`` (``--parallel ps``) writes epoch ends only."""

    def __init__(self, logs_dir, every: int, steps_per_epoch: int, first_step: int = 0, clock=None,
                 hparams: Optional[dict] = None, batch_hooks: bool = True):
        super().__init__()
        self._supports_tf_logs = True  # the step's tensors are not read between points
        self.dir, self.every, self.steps_per_epoch = Path(logs_dir), int(every), int(steps_per_epoch)
        self.step = self.first_step = int(first_step)
        self._epoch = 0
        self.clock, self.hparams, self.batch_hooks = clock, hparams, batch_hooks
        self.writer = None
        # (step, training seconds, loss sum, loss count) at the previous point of this epoch
        self._last: Optional[tuple] = None
        self._resume_last: Optional[tuple] = None
        self.dropped = 0  # events of a killed predecessor dropped on starting

    def _implements_train_batch_hooks(self):
        return self.batch_hooks

    # state in the run's checkpoints (RunCheckpoints state_of): the previous point of a resumed epoch
    def state(self) -> dict:
        return {"last": list(self._last) if self._last is not None else None}

    def restore(self, state: dict, mid_epoch: bool) -> None:
        if mid_epoch and state.get("last") is not None:
            self._resume_last = tuple(state["last"])

    def on_train_begin(self, logs=None):
        if self.first_step > 0:
            self.dropped = drop_events_after(self.dir, self.first_step)
        self.writer = tf.summary.create_file_writer(str(self.dir))
        if self.first_step == 0 and self.hparams:
            from tensorboard.plugins.hparams import api as hp

            with self.writer.as_default():
                hp.hparams(self.hparams)
            self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()

    def _seconds(self) -> float:
        return float(self.clock.state()["seconds"]) if self.clock is not None else 0.0

    def _loss_sums(self) -> tuple[float, float]:
        for metric in self.model.metrics:
            if metric.name == "loss" and hasattr(metric, "total") and hasattr(metric, "count"):
                return float(metric.total.numpy()), float(metric.count.numpy())
        return 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._resume_last is not None:  # resumed mid-epoch: its metrics are restored, and so is this
            self._last, self._resume_last = self._resume_last, None
        else:
            self._last = (self.step, self._seconds(), 0.0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        before, self.step = self.step, self._epoch * self.steps_per_epoch + batch + 1  # a call may run several steps
        if not crossed(before, self.step, self.every):
            return
        step0, seconds0, total0, count0 = self._last
        total, count = self._loss_sums()
        seconds = self._seconds()
        values = {}
        if count > count0:
            values["train/loss"] = (total - total0) / (count - count0)
        if seconds > seconds0 and count > count0:
            values["train/examples_per_second"] = (count - count0) / (seconds - seconds0)
        values.update(learning_rates(self.model.optimizer))
        self._write(values, self.step)
        self._last = (self.step, seconds, total, count)

    def on_epoch_end(self, epoch, logs=None):
        values = {}
        for key, value in (logs or {}).items():
            for prefix in ("val_", "test_"):
                if key.startswith(prefix):
                    values[f"{prefix[:-1]}/{key[len(prefix):]}"] = float(value)
                    break
            else:
                values[f"epoch/{key}"] = float(value)
        self._write(values, (epoch + 1) * self.steps_per_epoch)

    def curve_point(self, point: dict) -> None:
        names = {"eval_auc": "curve/auc", "eval_logloss": "curve/logloss", "eval_accuracy": "curve/accuracy",
                 "train_logloss": "curve/train_logloss", "train_accuracy": "curve/train_accuracy"}
        self._write({tag: float(point[key]) for key, tag in names.items() if key in point}, int(point["step"]))

    def _write(self, values: dict, step: int) -> None:
        if self.writer is None or not values:
            return
        with self.writer.as_default():
            for tag, value in values.items():
                tf.summary.scalar(tag, value, step=step)
        self.writer.flush()  # before the run's next checkpoint: a killed run loses no point it kept


def learning_rates(optimizer) -> dict:
    """``train/learning_rate`` (and ``train/embedding_learning_rate`` for the tables' own optimizer)
    as applied at the optimizer's last step."""
    from tfdlrm.training.schedule import learning_rate_now

    pairs = getattr(optimizer, "_optimizers_and_vars", None)  # TFRS CompositeOptimizer: tables first
    named = ({"train/embedding_learning_rate": pairs[0][0], "train/learning_rate": pairs[1][0]}
             if pairs and len(pairs) == 2 else {"train/learning_rate": optimizer})
    out = {}
    for tag, opt in named.items():
        value = learning_rate_now(opt)
        if value is not None:
            out[tag] = value
    return out
