"""``--early-stop PATIENCE``: end training once the validation AUC has not improved for PATIENCE epochs.

The decision reads the exact per-epoch validation metrics of ``EpochEvaluation``
(tfdlrm/training/callbacks.py): its best epoch is the one of the highest validation AUC (the
earliest of equals), so an epoch that only equals the best does not improve on it.  It keeps no
state of its own: a run resumed from the stopping epoch's checkpoint sees from the restored
evaluations that it has stopped.  See docs/training.md, **Early stopping**.
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tfdlrm.errors import UserError


def check_early_stop(patience: Optional[int], val_examples: int, data_name: str) -> None:
    """Refuse ``--early-stop`` on data without a validation split (the test split never selects)."""
    if patience is not None and not val_examples:
        raise UserError(f"--early-stop needs a validation split, and data {data_name} has none (convert with "
                        f"--halve-held-out, --val or --val-fraction; raw files take --val-data or --val-fraction)")


def patience_ran_out(epochs: list, best_epoch: Optional[int], patience: Optional[int]) -> bool:
    """Whether the last of ``epochs`` (EpochEvaluation's entries) is ``patience`` or more epochs
    after ``best_epoch``, the best on validation so far."""
    if patience is None or not epochs or best_epoch is None:
        return False
    if not any("val" in e for e in epochs):  # no validation split: no early stop
        return False
    return epochs[-1]["epoch"] - best_epoch >= patience


def stopped_after(evaluation, patience: Optional[int], epochs: int) -> Optional[int]:
    """The epoch after which ``--early-stop patience`` ended training before ``epochs``, judged from
    ``evaluation`` (an ``EpochEvaluation``, restored or run), or None."""
    entries = evaluation.epochs
    if entries and entries[-1]["epoch"] < epochs and patience_ran_out(entries, evaluation.best_epoch, patience):
        return entries[-1]["epoch"]
    return None


def describe_stop(stopped: int, best: int, patience: int) -> str:
    waited = stopped - best
    return (f"early stop after epoch {stopped}: the validation AUC has not improved for {waited} "
            f"epoch{'s' if waited != 1 else ''} (best epoch {best}, --early-stop {patience})")


class EarlyStop(tf.keras.callbacks.Callback):
    """Set ``model.stop_training`` once ``evaluation`` (an ``EpochEvaluation`` placed before
    this callback) finds no improvement for ``patience`` epochs.  The epoch's checkpoint is
    still written (by the callbacks after this one)."""

    def __init__(self, evaluation, patience: int):
        super().__init__()
        self.evaluation, self.patience = evaluation, int(patience)

    def on_epoch_end(self, epoch, logs=None):
        if patience_ran_out(self.evaluation.epochs, self.evaluation.best_epoch, self.patience):
            self.model.stop_training = True
