"""An epoch's batches, and what happens to its short last batch (``--last-batch``).

``keep`` trains on it as it is (``rows % batch_size`` rows, each weighing
``batch_size / rest`` times more in the mean loss than in a full batch: on small data
the held-out AUC dips after each one); ``drop`` leaves it out (with ``--shuffle once``
the same rows would never be seen, so prefer ``fold``); ``fold`` adds its rows to the
batch before it, so that every row trains once per epoch in full-size batches.
"""
from __future__ import annotations

import math

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import LAST_BATCH


def batches_per_epoch(rows: int, batch_size: int, last_batch: str = "keep") -> int:
    """How many batches an epoch of ``rows`` rows gives."""
    if last_batch not in LAST_BATCH:
        raise UserError(f"--last-batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}")
    full = rows // batch_size
    if last_batch != "keep" and full > 0:
        return full
    return math.ceil(rows / batch_size)


def rows_per_epoch(rows: int, batch_size: int, last_batch: str = "keep") -> int:
    """How many rows an epoch trains on (fewer than ``rows`` only with ``drop``)."""
    full = rows // batch_size
    return full * batch_size if last_batch == "drop" and full > 0 else rows


def odd_batches(rows: int, batch_size: int, last_batch: str = "keep") -> bool:
    """Does an epoch of ``rows`` rows have a batch of another size than ``batch_size`` (its short or
    folded last batch)?"""
    full, rest = divmod(rows, batch_size)
    return full == 0 or (rest > 0 and last_batch != "drop")


def rebatch(data: tf.data.Dataset, rows: int, batch_size: int, last_batch: str = "keep") -> tf.data.Dataset:
    """``data`` (any batching, ``rows`` rows in all) cut into the epoch's training batches."""
    full, rest = divmod(rows, batch_size)
    if last_batch == "drop" and full > 0:
        data = data.rebatch(batch_size, drop_remainder=True)
    elif last_batch == "fold" and full > 0 and rest:
        # One element per batch size: full - 1 batches of batch_size, then batch_size + rest.
        data = data.rebatch(tf.constant([batch_size] * (full - 1) + [batch_size + rest], tf.int64))
    else:
        data = data.rebatch(batch_size)
    return data.apply(tf.data.experimental.assert_cardinality(batches_per_epoch(rows, batch_size, last_batch)))
