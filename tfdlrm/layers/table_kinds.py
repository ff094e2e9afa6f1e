"""The maths of each table kind (tfdlrm/tables.py): which row of each part an id takes, how the parts'
rows make the id's vector, and how each part starts.  ``EmbeddingTables`` holds the variables.

An id's vector is made from its own rows before any bag pooling, so a bag's vector is the pool of its
ids' vectors exactly (the reference's ``QREmbeddingBag`` pools each part first and then combines, which
for ``mult`` is not the product of the ids' vectors).
"""
from __future__ import annotations

import math

import tensorflow as tf

from tfdlrm.tables import TableSpec


def part_ids(spec: TableSpec, ids) -> list:
    """The row each id takes in each part of ``spec``'s table (``ids`` any shape, known in range)."""
    if spec.kind == "qr":
        k = tf.cast(spec.collisions, ids.dtype)
        return [tf.math.floordiv(ids, k), tf.math.floormod(ids, k)]
    return [ids]


def combine(spec: TableSpec, rows: list, projection=None):
    """Each id's vector ``[..., dim]`` from its rows in the parts (``rows``: one ``[..., width]`` a row part),
    and for ``md`` the ``[width, dim]`` projection."""
    if spec.kind == "qr":
        quotient, remainder = rows
        if spec.operation == "mult":
            return quotient * remainder
        if spec.operation == "add":
            return quotient + remainder
        return tf.concat([quotient, remainder], axis=-1)
    if spec.kind == "md":
        return tf.tensordot(rows[0], tf.cast(projection, rows[0].dtype), axes=[[-1], [0]])
    return rows[0]


class RandomSigns(tf.keras.initializers.Initializer):
    """-1 or +1, each with probability 1/2."""

    def __call__(self, shape, dtype=None, **kwargs):
        bits = tf.random.uniform(shape, 0, 2, dtype=tf.int32)
        return tf.cast(2 * bits - 1, dtype or tf.float32)


def uniform(rows: int) -> tf.keras.initializers.Initializer:
    """The reference DLRM's table init: uniform(-sqrt(1/rows), sqrt(1/rows))."""
    bound = math.sqrt(1.0 / rows)
    return tf.keras.initializers.RandomUniform(-bound, bound)


def part_initializers(spec: TableSpec) -> list:
    """How each part of ``spec``'s table starts, so that every id's first vector is at a plain table's
    scale, U(-b, b) with b = 1/sqrt(rows) (mean 0, variance b^2 / 3 per value), and no two ids start alike:

    * full: that uniform (the reference's ``EmbeddingBag``);
    * qr ``mult``: the quotient rows that uniform, the remainder rows random signs (-1 or +1), so the
      product is that uniform too, ids sharing a quotient row differ by their remainder's signs, and each
      value's first steps are a plain table's (its quotient gradient is the gradient times +-1); qr ``add``: both parts
      U(-b / sqrt(2), b / sqrt(2)), so the sum has variance b^2 / 3; qr ``concat``: both that uniform
      (each half of the vector a plain table's).  The reference draws both parts from U(sqrt(1/rows), 1),
      all positive, where a sum starts near 1 per value, 16 x 40 times a plain table's for a 100k-row
      table (its issue #326: loss ~75 under Adagrad);
    * md: the rows that uniform, the projection Glorot-uniform (the reference's ``xavier_uniform_``).
    """
    bound = math.sqrt(1.0 / spec.rows)
    plain = uniform(spec.rows)
    if spec.kind == "qr":
        if spec.operation == "mult":
            return [plain, RandomSigns()]
        if spec.operation == "add":
            half = bound / math.sqrt(2.0)
            return [tf.keras.initializers.RandomUniform(-half, half), tf.keras.initializers.RandomUniform(-half, half)]
        return [plain, uniform(spec.rows)]
    if spec.kind == "md":
        return [plain, tf.keras.initializers.GlorotUniform()]
    return [plain]
