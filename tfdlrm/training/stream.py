"""The training batches as one stream over all epochs, resumable at any step."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import SHUFFLES

_SEED_MULTIPLIER = 1_000_003
_SEED_MODULUS = 2**31 - 1


EXECUTION_EXAMPLES = 4096  # examples a call of the train function covers (steps_per_execution, auto)
MAX_STEPS_PER_EXECUTION = 32


def steps_per_execution(batch_size: int, *intervals: Optional[int], asked: Optional[int] = None) -> int:
    """Training steps a call of Keras's train function runs (``steps_per_execution``): ``asked``,
    else about :data:`EXECUTION_EXAMPLES` examples' worth (at most 32 steps; 1 from batch 4096),
    the largest such count dividing every interval given (``--log-every``, ``--checkpoint-every``),
    so that those events fall on the end of a call.  Callbacks see a batch end per call; a batch
    of 128 spends ~0.5 ms a step in Python and Keras's loop otherwise (docs/benchmarks.md)."""
    if asked is not None:
        return int(asked)
    target = max(1, min(MAX_STEPS_PER_EXECUTION, EXECUTION_EXAMPLES // max(1, int(batch_size))))
    common = 0
    for interval in intervals:
        if interval:
            common = math.gcd(common, int(interval))
    if common == 0:
        return target
    return max(d for d in range(1, target + 1) if common % d == 0)


@contextmanager
def steps_a_call(model, steps: int) -> Iterator[None]:
    """Within the block, ``model.fit`` runs ``steps`` training steps a call of its train function
    (Keras's ``steps_per_execution``, which its data handler and train function read); 1 again
    after it.  The predict function (``predict_on_batch``: the callbacks' exact evaluations) is made
    first, so that it stays one batch a call."""
    counter = getattr(model, "_steps_per_execution", None)
    if steps == 1 or counter is None:
        yield
        return
    model.make_predict_function()  # while the counter is 1: a function of one batch, kept
    counter.assign(steps)
    model.train_function = None  # traced again: the loop of ``steps`` steps
    try:
        yield
    finally:
        counter.assign(1)
        model.train_function = None


def crossed(before: int, after: int, every: Optional[int]) -> bool:
    """Did the step count pass a multiple of ``every`` going from ``before`` to ``after``?  (A call
    of the train function may run several steps: an event due inside it happens at its end.)"""
    return bool(every) and after // every > before // every


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
