"""Where a table's rows live: a plain variable on its device, or a ``ShardedVariable`` split by rows
(hybrid placement, ParameterServerStrategy); gathering from either."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import tensorflow as tf


def _is_sharded(variable) -> bool:
    return bool(getattr(variable, "is_sharded_variable", False))


def _device_of(table) -> Optional[str]:
    """Where a table's lookup runs by default: a plain variable's device; None (the
    caller's device) for a row-split table, and for a mirrored one, which each
    replica reads on its own device."""
    if _is_sharded(table) or isinstance(table, tf.distribute.DistributedValues):
        return None
    return getattr(table, "device", None) or None


def _whole(variable):
    """A dense weight as one tensor (a row-split one concatenated), or None."""
    if variable is None or not _is_sharded(variable):
        return variable
    return tf.concat(list(variable.variables), axis=0)


def _device_scope(device: Optional[str]):
    return tf.device(device) if device else contextlib.nullcontext()


def sharded_gather(shards: Sequence[tf.Variable], ids):
    """Rows ``ids`` of a table split by rows into ``shards`` (in row order), ``ids.shape + [dim]``.

    Each id goes to the shard holding its row; each shard gathers on its own device
    (its gradient is ``IndexedSlices`` for that shard alone); the rows are stitched
    back into the order of ``ids``.
    """
    ids = tf.convert_to_tensor(ids)
    flat = tf.reshape(ids, [-1])
    sizes = [int(s.shape[0]) for s in shards]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    # shard of each id: how many shard starts (after the first) are <= id
    boundaries = tf.constant(starts[1:], dtype=flat.dtype)
    shard_of = tf.reduce_sum(tf.cast(flat[:, None] >= boundaries[None, :], tf.int32), axis=1)
    positions = tf.range(tf.size(flat))
    ids_per_shard = tf.dynamic_partition(flat, shard_of, len(shards))
    positions_per_shard = tf.dynamic_partition(positions, shard_of, len(shards))
    rows = []
    for shard, start, shard_ids in zip(shards, starts, ids_per_shard):
        with tf.device(shard.device):
            rows.append(tf.gather(shard, shard_ids - start))
    stitched = tf.dynamic_stitch(positions_per_shard, rows)  # [ids, dim]
    dim = shards[0].shape[1]
    return tf.reshape(stitched, tf.concat([tf.shape(ids), [dim]], axis=0))
