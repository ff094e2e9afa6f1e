"""Which checkpoint of a run to load or export: ``latest``, ``best``, ``epoch-N`` or ``step-N``.

``best`` is the epoch of the highest validation AUC, as the run's newest checkpoint records it
(``EpochEvaluation``'s state); ``--keep`` never deletes its checkpoint.  See docs/serving.md and
docs/training.md, **Checkpoints kept**.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.training.checkpoints import CheckpointStore, best_on_validation

CHOICES = "best, latest, epoch-N or step-N"
_NAMED = re.compile(r"^(epoch|step)-(\d+)$")


@dataclass
class ChosenCheckpoint:
    """A checkpoint of a run: ``prefix`` is what ``model.load_weights`` takes; ``record`` its
    JSON record (None for a run from before records, found by TensorFlow's index)."""

    asked: str
    prefix: str
    record: Optional[dict] = None
    best: bool = False  # the best epoch on validation

    @property
    def name(self) -> str:
        return Path(self.prefix).name

    def describe(self) -> dict:
        """What export.json records about it."""
        out = {"asked": self.asked, "name": self.name, "best_on_validation": self.best}
        if self.record is not None:
            out.update({k: self.record.get(k) for k in ("kind", "step", "epoch", "batch")})
        return out

    def label(self) -> str:
        return self.name + (", the best epoch on validation" if self.best else "")


def _available(good: list) -> str:
    names = []
    if good:
        best = best_on_validation(good[-1])
        if best is not None:
            names.append(f"best (epoch {best})")
        names.append(f"latest ({good[-1]['name']})")
    names += [r["name"] for r in good]
    return ", ".join(names) if names else "none"


def choose_checkpoint(directory: str | os.PathLike, which: Optional[str] = "latest",
                      run: Optional[str] = None) -> ChosenCheckpoint:
    """The checkpoint ``which`` (best, latest, epoch-N, step-N) of the checkpoint directory
    ``directory`` (of the run ``run``, for messages); one-line UserErrors otherwise."""
    which = "latest" if which is None else str(which).strip()
    run = run or str(Path(directory).parent)
    store = CheckpointStore(directory)
    good, _ = store.scan()
    named = _NAMED.match(which)
    if which not in ("latest", "best") and named is None:
        raise UserError(f"unknown checkpoint {which!r}: choose {CHOICES}; {run} has: {_available(good)}")
    if not good:
        legacy = tf.train.latest_checkpoint(str(directory)) if which == "latest" else None
        if legacy is None:
            raise UserError(f"{run} has no checkpoint under {Path(directory).name}/")
        return ChosenCheckpoint(which, legacy)
    if which == "latest":
        return ChosenCheckpoint(which, store.prefix(good[-1]), good[-1])
    best = best_on_validation(good[-1])
    if which == "best":
        if best is None:
            if (good[-1].get("state") or {}).get("epochs", {}).get("epochs"):
                raise UserError(f"--checkpoint best needs a validation split, and {run} trained without one (its "
                                f"best epoch is its last); use latest or epoch-N")
            raise UserError(f"{run} has no best epoch on validation yet (no epoch has ended); available: "
                            f"{_available(good)}")
        found = [r for r in good if r["kind"] == "epoch" and r["epoch"] == best]
        if not found:
            raise UserError(f"the best epoch on validation of {run}, epoch {best}, has no checkpoint left; "
                            f"available: {_available(good)}")
        return ChosenCheckpoint(which, store.prefix(found[-1]), found[-1], best=True)
    kind, number = named.group(1), int(named.group(2))
    if kind == "epoch":
        found = [r for r in good if r["kind"] == "epoch" and r["epoch"] == number]
    else:
        found = [r for r in good if r["step"] == number]
    if not found:
        raise UserError(f"{run} has no checkpoint {which}; available: {_available(good)}")
    record = found[-1]
    return ChosenCheckpoint(which, store.prefix(record), record,
                            best=record["kind"] == "epoch" and record["epoch"] == best)
