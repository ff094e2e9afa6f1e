"""The training batches as one stream over all epochs, resumable at any step."""
from __future__ import annotations

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import SHUFFLES

_SEED_MULTIPLIER = 1_000_003
_SEED_MODULUS = 2**31 - 1


def pass_seed(seed, p):
    """The shuffling seed of pass ``p`` over the training split (Python ints or int64 tensors)."""
    return (seed * _SEED_MULTIPLIER + p) % _SEED_MODULUS


def pass_order(seed, p, shuffle: str = "epoch"):
    """The order seed of pass ``p`` for ``--shuffle``: ``epoch`` a new order every pass,
    ``once`` one order per seed read the same way every pass (the reference DLRM's
    ``--data-randomize total``), ``none`` the stored order (None)."""
    if shuffle not in SHUFFLES:
        raise UserError(f"--shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
    if shuffle == "none":
        return None
    return pass_seed(seed, 0 if shuffle == "once" else p)


def training_stream(source, batch_size: int, seed: int, start: int, total: int, shuffle: str = "epoch",
                    last_batch: str = "keep") -> tf.data.Dataset:
    """Batches ``start`` .. ``total - 1`` of the run's stream of training batches.

    Every pass is built the same way (inside ``flat_map``), whether the run starts at
    batch 0 or resumes mid-pass, so the batches do not depend on where it started.
    """
    per_pass = source.train_batches(batch_size, last_batch)
    if total <= start:
        raise ValueError(f"nothing to train: start {start} >= total {total}")
    first, offset = divmod(start, per_pass)
    last = (total - 1) // per_pass
    base = tf.constant(seed, tf.int64)

    def one_pass(p):
        data = source.train_dataset(batch_size, seed=pass_order(base, p, shuffle), last_batch=last_batch)
        return data.skip(tf.where(tf.equal(p, first), tf.constant(offset, tf.int64), tf.constant(0, tf.int64)))

    return tf.data.Dataset.range(first, last + 1).flat_map(one_pass).take(total - start).prefetch(tf.data.AUTOTUNE)


class StartAt:
    """Where ``model.fit`` starts.  tf_keras's fit asks ``model._training_state`` (the hook its
    BackupAndRestore uses) for the initial epoch and step, and runs the rest of that epoch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch, initial_epoch, mode=None):
        return self.epoch, self.batch

    def attach(self, model) -> None:
        if not hasattr(model, "_maybe_load_initial_counters_from_ckpt") or not hasattr(model, "_training_state"):
            raise RuntimeError("this tf_keras has no hook to start model.fit mid-epoch")
        model._training_state = self  # noqa: SLF001

    @staticmethod
    def detach(model) -> None:
        if isinstance(getattr(model, "_training_state", None), StartAt):
            model._training_state = None  # noqa: SLF001
