"""Keras callbacks used by training runs."""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError


class TrainingClock(tf.keras.callbacks.Callback):
    """Wall time of the training part of each epoch (validation excluded)."""

    def __init__(self, seconds: float = 0.0):
        super().__init__()
        self.seconds = float(seconds)  # a resumed run starts from the seconds saved with its checkpoint
        self._start: Optional[float] = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def _stop(self):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` (spent saving a checkpoint) out of a running epoch's time."""
        if self._start is not None:
            self.seconds -= seconds

    def state(self) -> dict:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return {"seconds": self.seconds + running}


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int, last_checkpoint: Optional[str],
                 what: str = "the loss became NaN or infinite"):
        self.step, self.epoch, self.last_checkpoint = step, epoch, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before it"
        super().__init__(f"training diverged: {what} at step {step} (epoch {epoch}); {where}; try a lower --lr")


class StopOnNonFinite(tf.keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN or infinite, by raising
    :class:`TrainingDiverged`, so that no later callback saves the broken weights.

    ``checkpoints`` is a checkpoint directory, or a function naming the last good
    checkpoint; ``first_step`` the optimizer steps taken before this ``fit`` (a resumed run).
    """

    _supports_tf_logs = True

    def __init__(self, checkpoints: Union[str, Callable[[], Optional[str]], None] = None, first_step: int = 0):
        super().__init__()
        self.checkpoints = checkpoints
        self.step = int(first_step)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise TrainingDiverged(self.step, self.epoch, self.last_checkpoint())

    def last_checkpoint(self) -> Optional[str]:
        if callable(self.checkpoints):
            return self.checkpoints()
        return tf.train.latest_checkpoint(self.checkpoints) if self.checkpoints else None


class LearningCurve(tf.keras.callbacks.Callback):
    """Training and held-out metrics every ``every`` steps, against examples seen.

    Training accuracy and log loss are the means over the batches since the previous
    point, derived from Keras's running epoch means (no extra computation).  Held-out
    metrics are exact, over all of ``eval_dataset``.  ``points`` is a list of dicts:
    ``step, examples, train_accuracy, train_logloss, eval_auc, eval_logloss,
    eval_accuracy``.
    """

    def __init__(self, eval_dataset: tf.data.Dataset, every: int, batch_size: int):
        super().__init__()
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self.eval_dataset = eval_dataset
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.points: list[dict] = []
        self._step = 0
        self._epoch_batches = 0
        self._last = (0, 0.0, 0.0)  # batches into the epoch, running accuracy, running logloss
        self._resume_batches: Optional[int] = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._resume_batches is not None:  # a run resumed mid-epoch: the epoch's metrics are restored too
            self._epoch_batches, self._resume_batches = self._resume_batches, None
            return
        self._epoch_batches = 0
        self._last = (0, 0.0, 0.0)

    def state(self) -> dict:
        return {"every": self.every, "points": self.points, "step": self._step,
                "epoch_batches": self._epoch_batches, "last": list(self._last)}

    def restore(self, state: dict, mid_epoch: bool) -> None:
        """Continue from ``state()`` saved with a checkpoint (``mid_epoch``: saved inside an epoch)."""
        self.every = int(state["every"])
        self.points = [dict(p) for p in state["points"]]
        self._step = int(state["step"])
        if mid_epoch:
            self._resume_batches = int(state["epoch_batches"])
            self._last = tuple(state["last"])

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._epoch_batches = batch + 1
        if self._step % self.every == 0:
            self._record(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        if self._step % self.every != 0 and self._epoch_batches > self._last[0]:
            self._record(logs or {})  # the epoch's tail, so each epoch ends on a point

    def _record(self, logs: dict) -> None:
        from tfdlrm.training import evaluate

        n = self._epoch_batches
        acc = float(logs.get("accuracy", np.nan))
        loss = float(logs.get("logloss", logs.get("loss", np.nan)))
        n0, acc0, loss0 = self._last
        interval = n - n0
        train_acc = (n * acc - n0 * acc0) / interval
        train_loss = (n * loss - n0 * loss0) / interval
        self._last = (n, acc, loss)
        held_out = evaluate(self.model, self.eval_dataset)
        self.points.append({
            "step": self._step,
            "examples": self._step * self.batch_size,
            "train_accuracy": train_acc,
            "train_logloss": train_loss,
            "eval_auc": held_out.auc,
            "eval_logloss": held_out.logloss,
            "eval_accuracy": held_out.accuracy,
        })
