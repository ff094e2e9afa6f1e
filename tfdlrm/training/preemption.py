"""SIGTERM and SIGINT during ``model.fit``: checkpoint at the current step, then stop.

A preempted job (a scheduler's SIGTERM, Ctrl-C) loses no work: ``stop_signals`` catches the first
SIGTERM or SIGINT while ``model.fit`` runs (main thread only), and :class:`StopOnSignal`, the last
callback, writes a step checkpoint after the batch in progress (or lets the epoch's end, with its
evaluation and checkpoint, finish when that batch was the epoch's last) and raises
:class:`~tfdlrm.errors.Stopped`: the command line prints ``stopped by SIGTERM at step N;
checkpoint ... written; rerun the same command to resume`` and exits with 128 + the signal's number
(143, 130).  A second signal ends the process at once, as without the handler (the checkpoint
being written, if any, is incomplete and never taken; see checkpoints.py).  See
docs/fault-tolerance.md, **Preemption**.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import tensorflow as tf

from tfdlrm.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(tf.keras.callbacks.Callback):
    """Checkpoint and stop once ``signal_number`` is set (by :func:`stop_signals`).  Place it last,
    after the run's ``RunCheckpoints`` (``saver``; None: a run without a directory, nothing is
    saved).  ``check`` runs before a save (the NaN check: a diverged state is never saved).
    Until a signal comes, each batch costs one attribute test."""

    def __init__(self, saver, steps_per_epoch: int, check: Optional[Callable[[], None]] = None):
        super().__init__()
        self._supports_tf_logs = True
        self.saver, self.steps_per_epoch, self.check = saver, int(steps_per_epoch), check
        self.signal_number: Optional[int] = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.signal_number is None:
            return
        done = batch + 1
        if done >= self.steps_per_epoch:
            return  # the epoch's end comes next: its evaluation and checkpoint, then on_epoch_end stops
        if self.check is not None:
            self.check()
        name = self.saver.save_now(self.epoch, done, logs) if self.saver is not None else None
        self._stop(self.epoch * self.steps_per_epoch + done, name)

    def on_epoch_end(self, epoch, logs=None):
        if self.signal_number is None:
            return
        name = self.saver.saved[-1] if self.saver is not None and self.saver.saved else None  # this epoch's
        self._stop((epoch + 1) * self.steps_per_epoch, name)

    def _stop(self, step: int, name: Optional[str]):
        prefix = str(self.saver.store.dir / name) if name is not None else None
        number = self.signal_number
        raise Stopped(signal.Signals(number).name, number, step, prefix)


@contextmanager
def stop_signals(stopper: Optional[StopOnSignal]) -> Iterator[None]:
    """While the block runs, the first SIGTERM or SIGINT sets ``stopper.signal_number`` (and says so
    on stderr); the handlers are then reset to the default, so that a second signal ends the
    process at once.  Outside the main thread (where Python allows no handler), or without a
    stopper, nothing changes."""
    if stopper is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(number, frame):
        if stopper.signal_number is None:
            stopper.signal_number = number
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(number).name
        # os.write: a signal handler may run in the middle of a print
        os.write(2, f"{name} received: stopping after this step with a checkpoint (send it again to stop "
                    f"at once, without one)\n".encode())

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
