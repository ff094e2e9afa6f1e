"""Training progress that reads the step's tensors only when it shows something.

Keras's progress bar converts the loss and metrics of every step (a host sync each step) and
draws with backspaces and carriage returns, which a log file keeps.  :class:`Progress` prints,
where standard output is not a terminal, one plain line every tenth of an epoch or every 30
seconds, whichever comes first::

    epoch 1/3  40%  step 312/781  loss 0.4521  14,210 examples/s  eta 0:42

and on a terminal redraws one such line (about once a second); each epoch ends with a line of its
exact held-out metrics.  Between lines a batch costs a counter and a clock reading.
See docs/training.md, **Progress**.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

import tensorflow as tf


def format_duration(seconds: float) -> str:
    """``0:42``, ``12:03``, ``1:02:03``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _metrics(logs: dict, prefix: str) -> str:
    parts = [f"{name} {float(logs[prefix + name]):.4f}" for name in ("auc", "logloss", "accuracy")
             if prefix + name in logs]
    return "  ".join(parts)


class Progress(tf.keras.callbacks.Callback):
    """Progress lines through ``write`` (``terminal=False``), or one line redrawn in place on
    ``stream`` (``terminal=True``).  ``clock`` is the run's ``TrainingClock`` (examples/s count
    training time only); ``first_epoch`` and ``first_batch`` where this ``fit`` starts (a resumed
    run)."""

    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, clock, write: Callable[[str], None] = print,
                 terminal: bool = False, stream=None, first_epoch: int = 0, first_batch: int = 0,
                 fraction: float = 0.1, seconds: float = 30.0, redraw_seconds: float = 1.0, batch_hooks: bool = True):
        super().__init__()
        self._supports_tf_logs = True  # read only when a line is shown
        self.batch_hooks = batch_hooks  # False (--parallel ps: no batch-level callbacks): epoch ends only
        self.epochs, self.steps, self.batch_size, self.clock = int(epochs), int(steps_per_epoch), batch_size, clock
        self.write, self.terminal, self.stream = write, terminal, stream
        self.first_epoch, self.first_batch = first_epoch, first_batch
        self.fraction, self.seconds = fraction, (redraw_seconds if terminal else seconds)
        self.epoch = 0
        self._next = 0  # the batch count at which the next line is due
        self._deadline = 0.0  # or the time
        self._last = (0, 0.0)  # batches done, training seconds at the last line
        self._epoch_start = (0, 0.0, 0.0)  # batches done, training seconds, wall time at the epoch's start here
        self._width = 0  # of the line drawn on the terminal

    def _implements_train_batch_hooks(self):
        return self.batch_hooks

    def _training_seconds(self) -> float:
        return self.clock.state()["seconds"] if self.clock is not None else time.perf_counter()

    def _due_after(self, done: int) -> int:
        """The next tenth of the epoch after ``done`` batches (in batches)."""
        step = max(1, math.ceil(self.steps * self.fraction)) if not self.terminal else self.steps + 1
        return (done // step + 1) * step

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        done = self.first_batch if epoch == self.first_epoch else 0
        seconds = self._training_seconds()
        self._last = (done, seconds)
        self._epoch_start = (done, seconds, time.monotonic())
        self._next = self._due_after(done)
        self._deadline = time.monotonic() + self.seconds

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        if done < self._next and time.monotonic() < self._deadline:
            return
        if done >= self.steps:  # the epoch's end line follows
            return
        self._show(done, logs or {})
        self._next = self._due_after(done)
        self._deadline = time.monotonic() + self.seconds

    def _show(self, done: int, logs: dict) -> None:
        seconds = self._training_seconds()
        done0, seconds0 = self._last
        rate = (done - done0) * self.batch_size / (seconds - seconds0) if seconds > seconds0 else float("nan")
        start_done, start_seconds, _ = self._epoch_start
        per_step = (seconds - start_seconds) / (done - start_done) if done > start_done else float("nan")
        self._last = (done, seconds)
        loss = logs.get("loss")
        line = (f"epoch {self.epoch + 1}/{self.epochs}  {100 * done // self.steps:3d}%  step {done:,}/{self.steps:,}"
                + (f"  loss {float(loss):.4f}" if loss is not None else "")
                + (f"  {rate:,.0f} examples/s" if math.isfinite(rate) else "")
                + f"  eta {format_duration((self.steps - done) * per_step)}")
        self._emit(line, final=False)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        done, seconds, wall = self._epoch_start
        trained = self._training_seconds() - seconds
        parts = [f"epoch {epoch + 1}/{self.epochs}  done in {format_duration(time.monotonic() - wall)}"]
        if trained > 0 and self.steps > done:
            parts.append(f"{(self.steps - done) * self.batch_size / trained:,.0f} examples/s")
        if "loss" in logs:
            parts.append(f"loss {float(logs['loss']):.4f}")
        for split in ("val", "test"):
            text = _metrics(logs, f"{split}_")
            if text:
                parts.append(f"{split}: {text}")
        self._emit("  ".join(parts), final=True)

    def _emit(self, line: str, final: bool) -> None:
        if not self.terminal:
            self.write(line)
            sys.stdout.flush()  # a pipe or a file: each line as it comes
            return
        stream = self.stream or sys.stdout
        stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
        stream.flush()
        self._width = 0 if final else len(line)


def progress_for(verbose, epochs: int, steps_per_epoch: int, batch_size: int, clock, write, first_epoch: int,
                 first_batch: int, batch_hooks: bool = True) -> tuple[int, Optional[Progress]]:
    """``model.fit``'s ``verbose`` and the :class:`Progress` callback (or None) for ``TrainSpec.verbose``:
    ``auto`` our progress (a line redrawn on a terminal, plain lines otherwise), 0 none, 1 and 2
    Keras's own (its bar, converting every step's metrics; a line per epoch)."""
    if verbose != "auto":
        return int(verbose), None
    terminal = bool(getattr(sys.stdout, "isatty", lambda: False)())
    return 0, Progress(epochs, steps_per_epoch, batch_size, clock, write, terminal=terminal,
                       first_epoch=first_epoch, first_batch=first_batch, batch_hooks=batch_hooks)
