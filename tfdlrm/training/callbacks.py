"""Callbacks of a training run: its clock, the NaN stop, learning curves, checkpoints."""
from __future__ import annotations

import time
from typing import Callable, Optional, Union

import numpy as np
import tensorflow as tf

from tfdlrm.errors import TrainingDiverged
from tfdlrm.training.checkpoints import (
    CheckpointStore,
    metric_state,
    non_finite_variable,
    restore_metric_state,
)
from tfdlrm.training.stream import crossed, pass_order


class TrainingClock(tf.keras.callbacks.Callback):
    """Wall time of the training part of each epoch (held-out evaluations and checkpoint writes
    excluded)."""

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
        """Take ``seconds`` (spent saving a checkpoint, or on a learning-curve point's evaluation)
        out of a running epoch's time."""
        if self._start is not None:
            self.seconds -= seconds

    def state(self) -> dict:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return {"seconds": self.seconds + running}


class StopOnNonFinite(tf.keras.callbacks.Callback):
    """Stop once the loss has become NaN or infinite, by raising :class:`TrainingDiverged` naming
    the first such step, so that no later callback saves the broken weights.

    ``checkpoints`` is a checkpoint directory, or a function naming the last good
    checkpoint; ``first_step`` the optimizer steps taken before this ``fit`` (a resumed run).
    The loss is read every ``every`` steps (at most ``MAX_UNREAD``), at multiples of ``also_every``
    (the checkpoint steps) and at each epoch end (``check()``: also before any other save), not
    each step: reading a step's tensor waits for that step.  The losses between are kept unread
    and read together, so the step named is exact (Keras's ``loss`` is the epoch's running mean:
    NaN from its first NaN batch on); with several steps a call of the train function
    (``steps_per_execution``) Keras gives one loss a call, and the step named is the end of the
    call in which the loss became NaN.
    """

    MAX_UNREAD = 1000  # loss tensors held between two reads

    def __init__(self, checkpoints: Union[str, Callable[[], Optional[str]], None] = None, first_step: int = 0,
                 every: int = 1, also_every: Optional[int] = None, steps_per_epoch: Optional[int] = None):
        super().__init__()
        self._supports_tf_logs = True  # the logs' tensors, unread (Callback.__init__ sets it on the instance)
        self.checkpoints = checkpoints
        self.step = int(first_step)
        self.epoch = 0
        self.every, self.also_every = int(every), also_every
        self.steps_per_epoch = steps_per_epoch  # given: steps from the batch index (several steps a call)
        self._pending: list = []  # (step, loss tensor) since the last check

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        before = self.step
        self.step = (self.epoch - 1) * self.steps_per_epoch + batch + 1 if self.steps_per_epoch else self.step + 1
        loss = (logs or {}).get("loss")
        if loss is not None:
            self._pending.append((self.step, loss))
        if (crossed(before, self.step, self.every) or crossed(before, self.step, self.also_every)
                or len(self._pending) >= self.MAX_UNREAD):
            self.check()

    def on_epoch_end(self, epoch, logs=None):
        self.check()

    def check(self) -> None:
        """Read the losses since the last check; raise at the first that is not finite."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = np.isfinite(np.asarray(tf.stack([loss for _, loss in pending]), np.float64))
        if not finite.all():
            raise TrainingDiverged(pending[int(np.argmin(finite))][0], self.epoch, self.last_checkpoint())

    def last_checkpoint(self) -> Optional[str]:
        if callable(self.checkpoints):
            return self.checkpoints()
        return tf.train.latest_checkpoint(self.checkpoints) if self.checkpoints else None


class LearningCurve(tf.keras.callbacks.Callback):
    """Training and held-out metrics every ``every`` steps, against examples seen.

    Training accuracy and log loss are the means over the batches since the previous
    point, derived from Keras's running epoch means (no extra computation).  Held-out
    metrics are exact, over all of ``eval_dataset`` (``train``: the first ``--curve-examples``
    rows of the validation split where there is one); their time is taken out of ``clock``'s.
    ``points`` is a list of dicts: ``step, examples, train_accuracy, train_logloss, train_auc,
    eval_auc, eval_logloss, eval_accuracy, eval_examples``; ``seconds`` their evaluations' time.
    """

    def __init__(self, eval_dataset: tf.data.Dataset, every: int, batch_size: int, clock=None):
        super().__init__()
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self._supports_tf_logs = True  # the logs' tensors are read at the points only
        self.eval_dataset = eval_dataset
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.clock = clock  # a TrainingClock: the points' evaluations are taken out of the training time
        self.seconds = 0.0  # the points' evaluations, in all
        self.setup_seconds = 0.0  # this process's first pass (see on_train_begin)
        self.points: list[dict] = []
        self.on_point: Optional[Callable[[dict], None]] = None  # called with each new point (TensorBoard)
        self._step = 0
        self._epoch_batches = 0
        self._last = (0, 0.0, 0.0)  # batches into the epoch, running accuracy, running logloss
        self._resume_batches: Optional[int] = None

    def on_train_begin(self, logs=None):
        """One pass over the points' rows before training: it traces the prediction function (which
        the epoch end would otherwise trace) and fills the rows' cache, so that each point costs
        what it adds; its time is ``setup_seconds``, apart from the points'."""
        from tfdlrm.training.evaluate import evaluate

        started = time.perf_counter()
        evaluate(self.model, self.eval_dataset)
        self.setup_seconds += time.perf_counter() - started

    def on_epoch_begin(self, epoch, logs=None):
        if self._resume_batches is not None:  # a run resumed mid-epoch: the epoch's metrics are restored too
            self._epoch_batches, self._resume_batches = self._resume_batches, None
            return
        self._epoch_batches = 0
        self._last = (0, 0.0, 0.0)

    def state(self) -> dict:
        return {"every": self.every, "points": self.points, "step": self._step,
                "epoch_batches": self._epoch_batches, "last": list(self._last), "seconds": self.seconds}

    def restore(self, state: dict, mid_epoch: bool) -> None:
        """Continue from ``state()`` saved with a checkpoint (``mid_epoch``: saved inside an epoch)."""
        self.every = int(state["every"])
        self.points = [dict(p) for p in state["points"]]
        self._step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))
        if mid_epoch:
            self._resume_batches = int(state["epoch_batches"])
            self._last = tuple(state["last"])

    def on_train_batch_end(self, batch, logs=None):
        before = self._step
        self._step += batch + 1 - self._epoch_batches  # a call of the train function may run several steps
        self._epoch_batches = batch + 1
        if crossed(before, self._step, self.every):
            self._record(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        if self._step % self.every != 0 and self._epoch_batches > self._last[0]:
            self._record(logs or {})  # the epoch's tail, so each epoch ends on a point

    def _record(self, logs: dict) -> None:
        from tfdlrm.training.evaluate import evaluate

        n = self._epoch_batches
        acc = float(logs.get("accuracy", np.nan))
        loss = float(logs.get("logloss", logs.get("loss", np.nan)))
        n0, acc0, loss0 = self._last
        interval = n - n0
        train_acc = (n * acc - n0 * acc0) / interval
        train_loss = (n * loss - n0 * loss0) / interval
        self._last = (n, acc, loss)
        started = time.perf_counter()
        held_out = evaluate(self.model, self.eval_dataset)
        seconds = time.perf_counter() - started
        if self.clock is not None:
            self.clock.exclude(seconds)
        self.points.append({
            "step": self._step,
            "examples": self._step * self.batch_size,
            "train_accuracy": train_acc,
            "train_logloss": train_loss,
            "train_auc": float(logs.get("auc", np.nan)),  # Keras's running (bucketed) AUC of the epoch so far
            "eval_auc": held_out.auc,
            "eval_logloss": held_out.logloss,
            "eval_accuracy": held_out.accuracy,
            "eval_examples": held_out.examples,
        })
        self.seconds += seconds
        if self.on_point is not None:
            self.on_point(self.points[-1])


class EpochEvaluation(tf.keras.callbacks.Callback):
    """Exact metrics at every epoch end on the validation split (which selects the best
    epoch) and on the test split (which is only reported), in place of Keras's bucketed
    ``validation_data`` pass.

    The validation metrics go into the epoch's logs as ``val_auc``, ``val_logloss``,
    ``val_accuracy`` and the test ones as ``test_*`` (so History and TensorBoard record
    them); ``epochs`` is the list of ``{"epoch", "step", "val", "test"}``, ``best_epoch``
    the epoch of the highest validation AUC (the last epoch where there is no validation
    split), and ``best_predictions`` the test labels and probabilities at that epoch, for
    paired comparisons (tfdlrm/stats.py).
    """

    KEEP_PREDICTIONS = 5_000_000  # held-out rows up to which the best epoch's predictions are kept

    def __init__(self, test_dataset: tf.data.Dataset, val_dataset: Optional[tf.data.Dataset] = None,
                 on_best: Optional[Callable] = None):
        super().__init__()
        self.test_dataset, self.val_dataset, self.on_best = test_dataset, val_dataset, on_best
        self.epochs: list[dict] = []
        self.best_epoch: Optional[int] = None
        self.best_predictions = None
        self.seconds = 0.0  # the evaluations' time, in all

    def state(self) -> dict:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "seconds": self.seconds}

    def restore(self, state: dict, mid_epoch: bool = False) -> None:
        self.epochs = [dict(e) for e in state.get("epochs", [])]
        self.best_epoch = state.get("best_epoch")
        self.seconds = float(state.get("seconds", 0.0))

    def on_epoch_end(self, epoch, logs=None):
        from tfdlrm.metrics import evaluate_predictions
        from tfdlrm.training.evaluate import evaluate, predict_with_labels

        logs = logs if logs is not None else {}
        started = time.perf_counter()
        entry = {"epoch": epoch + 1, "step": int(self.model.optimizer.iterations.numpy())}
        if self.val_dataset is not None:
            val = evaluate(self.model, self.val_dataset)
            entry["val"] = val.to_dict()
            logs.update(val_auc=val.auc, val_logloss=val.logloss, val_accuracy=val.accuracy)
        labels, probabilities = predict_with_labels(self.model, self.test_dataset)
        test = evaluate_predictions(labels, probabilities)
        entry["test"] = test.to_dict()
        self.seconds += time.perf_counter() - started
        logs.update(test_auc=test.auc, test_logloss=test.logloss, test_accuracy=test.accuracy)
        self.epochs = [e for e in self.epochs if e["epoch"] < entry["epoch"]] + [entry]
        best = self._best()
        self.best_epoch = best
        if best == entry["epoch"] and labels.size <= self.KEEP_PREDICTIONS:
            self.best_predictions = (labels, probabilities)
            if self.on_best is not None:
                self.on_best(labels, probabilities)

    def _best(self) -> int:
        with_val = [e for e in self.epochs if "val" in e and np.isfinite(e["val"]["auc"])]
        if not with_val:
            return self.epochs[-1]["epoch"]
        return max(with_val, key=lambda e: (e["val"]["auc"], -e["epoch"]))["epoch"]


class RunCheckpoints(tf.keras.callbacks.Callback):
    """Save the run every ``every`` steps (None: never mid-epoch) and at each epoch end.

    Never saves a state with a non-finite loss, weight or slot: it raises
    :class:`~tfdlrm.errors.TrainingDiverged` instead.  ``history`` is the whole run's
    (earlier processes' epochs included).  ``state_of`` maps a name to an object with
    ``state()`` (saved in each record) for other callbacks to resume from.
    """

    def __init__(self, store: CheckpointStore, every: Optional[int], steps_per_epoch: int, batches_per_pass: int,
                 seed: int, start_epoch: int = 0, start_batch: int = 0, history: Optional[dict] = None,
                 shuffle: str = "epoch",
                 metrics: Optional[dict] = None, extra: Optional[dict] = None, state_of: Optional[dict] = None,
                 clock=None, identity: Optional[dict] = None):
        super().__init__()
        self._supports_tf_logs = True  # the logs' tensors are read at a save only
        self.store, self.every = store, every
        self.steps_per_epoch, self.batches_per_pass, self.seed = steps_per_epoch, batches_per_pass, seed
        self.shuffle = shuffle
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self._resume_metrics = metrics
        self.extra = dict(extra or {})
        self.state_of = dict(state_of or {})
        self.clock = clock
        self.identity = dict(identity or {})
        self.epoch, self.batch = start_epoch, start_batch
        self.saved: list[str] = []

    def _implements_train_batch_hooks(self):
        return self.every is not None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.batch = self.start_batch if epoch == self.start_epoch else 0
        if epoch == self.start_epoch and self._resume_metrics is not None:
            restore_metric_state(self.model, self._resume_metrics)  # after fit's reset of the metrics
            self._resume_metrics = None

    def on_train_batch_end(self, batch, logs=None):
        before = self.epoch * self.steps_per_epoch + self.batch
        self.batch = batch + 1
        step = self.epoch * self.steps_per_epoch + self.batch
        if crossed(before, step, self.every) and self.batch < self.steps_per_epoch:
            self._save("step", f"step-{step:08d}", step, self.epoch, self.batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        step = (epoch + 1) * self.steps_per_epoch
        self._save("epoch", f"epoch-{epoch + 1:03d}", step, epoch + 1, 0, logs)

    def save_now(self, epoch: int, batch: int, logs=None) -> str:
        """A step checkpoint after ``batch`` batches of ``epoch`` (0-based; not its last batch), unless
        that step's checkpoint was just written; returns its name (a stop by signal: preemption.py)."""
        step = epoch * self.steps_per_epoch + batch
        name = f"step-{step:08d}"
        if not self.saved or self.saved[-1] != name:
            self._save("step", name, step, epoch, batch, logs)
        return name

    def _save(self, kind, name, step, epoch, batch, logs):
        from tfdlrm.errors import TrainingDiverged

        started = time.perf_counter()
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise TrainingDiverged(step, epoch + (kind == "step"), self.store.describe_latest())
        bad = non_finite_variable(self.model)
        if bad is not None:
            raise TrainingDiverged(step, epoch + (kind == "step"), self.store.describe_latest(),
                                   what=f"{bad} became NaN or infinite")
        position = epoch * self.steps_per_epoch + batch
        record = dict(self.identity)
        record.update({
            "kind": kind, "step": step, "epoch": epoch, "batch": batch,
            "data": {"position": position, "batches_per_pass": self.batches_per_pass,
                     "pass": position // self.batches_per_pass, "offset": position % self.batches_per_pass,
                     "seed": self.seed, "shuffle": self.shuffle,
                     "pass_seed": pass_order(self.seed, position // self.batches_per_pass, self.shuffle)},
            "metrics": metric_state(self.model) if kind == "step" else None,
            "history": self.history,
            "extra": self.extra,
        })
        record["state"] = {key: obj.state() for key, obj in self.state_of.items()}
        self.store.save(self.model, name, record)
        self.saved.append(name)
        if self.clock is not None:
            self.clock.exclude(time.perf_counter() - started)
