"""Generated data: ``random`` (the paper's benchmark data) and ``synthetic`` (learnable).

Both are streams of batches computed from ``(seed, batch index)`` with TensorFlow's
stateless random ops: deterministic for a seed, computed in parallel by tf.data,
never materialised in memory, and able to start at any batch (for resuming).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError

SPLITS = {"train": 0, "eval": 1, "val": 2}
DENSE_DISTRIBUTIONS = ("uniform", "normal")


def _seed(seed: int, split: str, batch: tf.Tensor) -> tf.Tensor:
    """A stateless seed pair for batch ``batch`` of ``split``: train and eval interleave
    (2i, 2i + 1), val takes the negative numbers, so no two batches share a seed."""
    if SPLITS[split] == 2:
        return tf.stack([tf.constant(seed, tf.int64), -1 - tf.cast(batch, tf.int64)])
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(batch, tf.int64) * 2 + SPLITS[split]])


def _batched(make_batch, num_batches: int, start_batch: int, order_seed: Optional[int]) -> tf.data.Dataset:
    """``make_batch(i)`` for ``i`` in ``[start_batch, num_batches)``, in parallel, in order.

    With ``order_seed`` the batch indices are visited in a seeded random order that
    differs from epoch to epoch (the data set stays the same).
    """
    if not 0 <= start_batch <= num_batches:
        raise UserError(f"start batch {start_batch} is outside the {num_batches} batches of the split")
    indices = tf.data.Dataset.range(num_batches)
    if order_seed is not None:
        indices = indices.shuffle(num_batches, seed=order_seed, reshuffle_each_iteration=True)
    indices = indices.skip(start_batch)
    return indices.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
        tf.data.AUTOTUNE
    )


def _uniform_ids(shape, rows: tf.Tensor, seed) -> tf.Tensor:
    """Ids uniform in ``[0, rows)``; ``rows`` broadcasts against ``shape``."""
    u = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float64)
    return tf.minimum(tf.cast(u * tf.cast(rows, tf.float64), tf.int64), rows - 1)


@dataclass(frozen=True)
class RandomData:
    """The paper's random benchmark data.

    Dense features uniform in [0, 1) or standard normal; for each categorical feature
    ``ids_per_lookup`` ids (``variable_bags``: a count uniform in [1, ids_per_lookup])
    uniform in ``[0, rows)``; labels 0/1 with probability 1/2 (nothing to learn).
    """

    table_rows: tuple[int, ...]
    num_dense: int
    ids_per_lookup: int = 1
    variable_bags: bool = False
    dense_distribution: str = "uniform"
    seed: int = 0

    def __post_init__(self):
        if self.dense_distribution not in DENSE_DISTRIBUTIONS:
            raise UserError(
                f"dense distribution must be one of {', '.join(DENSE_DISTRIBUTIONS)}, got {self.dense_distribution!r}"
            )
        if self.ids_per_lookup < 1:
            raise UserError(f"ids per lookup must be >= 1, got {self.ids_per_lookup}")

    def batch(self, index, batch_size: int, split: str = "train"):
        seed = _seed(self.seed, split, index)
        seeds = tf.random.experimental.stateless_split(seed, 4)
        tables = len(self.table_rows)
        rows = tf.constant(self.table_rows, tf.int64)
        if self.dense_distribution == "uniform":
            dense = tf.random.stateless_uniform([batch_size, self.num_dense], seed=seeds[0])
        else:
            dense = tf.random.stateless_normal([batch_size, self.num_dense], seed=seeds[0])
        k = self.ids_per_lookup
        if k == 1:
            sparse = _uniform_ids([batch_size, tables], rows[None, :], seeds[1])
        elif not self.variable_bags:
            sparse = _uniform_ids([batch_size, tables, k], rows[None, :, None], seeds[1])
        else:
            counts = tf.random.stateless_uniform([batch_size * tables], seed=seeds[2], minval=1,
                                                 maxval=k + 1, dtype=tf.int64)
            table_of_bag = tf.tile(tf.range(tables, dtype=tf.int64), [batch_size])
            value_rows = tf.repeat(tf.gather(rows, table_of_bag), counts)
            values = _uniform_ids(tf.shape(value_rows), value_rows, seeds[1])
            bags = tf.RaggedTensor.from_row_lengths(values, counts)
            sparse = tf.RaggedTensor.from_uniform_row_length(bags, tables)
        labels = tf.round(tf.random.stateless_uniform([batch_size, 1], seed=seeds[3]))
        return {"dense": dense, "sparse": sparse}, labels

    def dataset(self, batch_size: int, num_batches: int, split: str = "train", start_batch: int = 0,
                order_seed: Optional[int] = None) -> tf.data.Dataset:
        return _batched(lambda i: self.batch(i, batch_size, split), num_batches, start_batch, order_seed)


# Teacher vectors per table are kept to this many rows (ids alias modulo it), which
# keeps the teacher small for million-row tables; Zipf ids rarely pass it anyway.
TEACHER_ROWS = 20_000


class SyntheticData:
    """Criteo-shaped rows with skewed ids and labels from a fixed random teacher.

    * Ids of table f follow a bounded Zipf-like law with exponent ``s_f`` in
      [1.05, 1.35] (continuous inverse-CDF sampling), scrambled by a fixed
      bijection so that hot ids are spread over the table.
    * Dense features look like Criteo's after ``log(1 + max(x, 0))``: log-normal
      counts, about 20% zeros.
    * Labels are Bernoulli(sigmoid(logit)) with the teacher's logit: a per-id bias,
      a dense linear term and pairwise dot products of per-id teacher vectors and a
      projection of the dense features, intercept set for a ~25% click rate.

    The teacher's own AUC on the eval split (``teacher_auc``) is the ceiling a model
    can approach.  The "world" (teacher, exponents) is fixed by ``seed``.
    """

    TEACHER_DIM = 4
    CLICK_RATE = 0.25

    def __init__(self, table_rows: Sequence[int], num_dense: int = 13, seed: int = 0,
                 pairwise_scale: float = 1.0, linear_scale: float = 0.6):
        self.table_rows = tuple(int(r) for r in table_rows)
        self.num_dense = int(num_dense)
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 20190531])
        tables, k = len(self.table_rows), self.TEACHER_DIM
        self.exponents = rng.uniform(1.05, 1.35, size=tables)
        self.multipliers = np.array([_coprime_multiplier(r, rng) for r in self.table_rows], np.int64)
        self.offsets = np.array([rng.integers(0, r) for r in self.table_rows], np.int64)
        self.teacher_rows = np.array([min(r, TEACHER_ROWS) for r in self.table_rows], np.int64)
        t_off = np.concatenate([[0], np.cumsum(self.teacher_rows)[:-1]])
        self.teacher_offsets = t_off.astype(np.int64)
        total = int(self.teacher_rows.sum())
        n_vectors = tables + 1
        self.teacher_vectors = (rng.normal(size=(total, k)) * pairwise_scale / math.sqrt(k * math.sqrt(
            n_vectors * (n_vectors - 1) / 2))).astype(np.float32)
        self.teacher_bias = (rng.normal(size=total) * linear_scale / math.sqrt(tables)).astype(np.float32)
        self.dense_mu = rng.uniform(0.0, 3.0, size=self.num_dense)
        self.dense_sigma = rng.uniform(0.5, 1.5, size=self.num_dense)
        self.dense_projection = (rng.normal(size=(self.num_dense, k)) / math.sqrt(self.num_dense)).astype(np.float32)
        self.dense_weights = (rng.normal(size=self.num_dense) * linear_scale / math.sqrt(self.num_dense)).astype(
            np.float32)
        self.intercept = 0.0
        self.intercept = self._calibrate_intercept()

    # -- the world -------------------------------------------------------------
    def _draw(self, batch_size: int, s_dense, s_zero, s_ids):
        """Raw counts (float64 [batch, num_dense], about 20% zeros) and ids (int64 [batch, tables])."""
        tables = len(self.table_rows)
        normal = tf.random.stateless_normal([batch_size, self.num_dense], seed=s_dense, dtype=tf.float64)
        counts = tf.floor(tf.exp(self.dense_mu + self.dense_sigma * normal))
        zero = tf.random.stateless_uniform([batch_size, self.num_dense], seed=s_zero, dtype=tf.float64) < 0.2
        counts = tf.where(zero, tf.zeros_like(counts), counts)

        rows = tf.constant(self.table_rows, tf.float64)[None, :]
        s = tf.constant(self.exponents, tf.float64)[None, :]
        u = tf.random.stateless_uniform([batch_size, tables], seed=s_ids, dtype=tf.float64)
        # Inverse CDF of the density ~ x^-s on [1, rows + 1).
        top = tf.pow(rows + 1.0, 1.0 - s)
        x = tf.pow((top - 1.0) * u + 1.0, 1.0 / (1.0 - s))
        rank = tf.minimum(tf.cast(tf.floor(x), tf.int64) - 1, tf.cast(rows, tf.int64) - 1)
        rank = tf.maximum(rank, 0)
        table_rows = tf.constant(self.table_rows, tf.int64)[None, :]
        ids = tf.math.floormod(rank * self.multipliers[None, :] + self.offsets[None, :], table_rows)
        return counts, ids

    def _sample(self, batch_size: int, seed):
        s_dense, s_zero, s_ids, s_label = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        counts, ids = self._draw(batch_size, s_dense, s_zero, s_ids)
        dense = tf.cast(tf.math.log1p(counts), tf.float32)
        logit = self._teacher_logit(dense, ids)
        p = tf.sigmoid(logit)
        labels = tf.cast(tf.random.stateless_uniform([batch_size, 1], seed=s_label) < p, tf.float32)
        return dense, ids, labels, p

    def _teacher_logit(self, dense, ids, present=None):
        t_index = tf.math.floormod(ids, self.teacher_rows[None, :]) + self.teacher_offsets[None, :]
        vectors = tf.gather(tf.constant(self.teacher_vectors), t_index)  # [batch, tables, k]
        bias = tf.gather(tf.constant(self.teacher_bias), t_index)  # [batch, tables]
        if present is not None:  # raw rows: a missing value contributes nothing
            vectors = vectors * tf.cast(present, tf.float32)[:, :, None]
            bias = bias * tf.cast(present, tf.float32)
        centred = (dense - 1.5) / 1.5
        dense_vec = tf.matmul(centred, self.dense_projection)[:, None, :]  # [batch, 1, k]
        all_vectors = tf.concat([dense_vec, vectors], axis=1)
        total = tf.reduce_sum(all_vectors, axis=1)
        # sum_{i<j} <v_i, v_j> = (|sum v|^2 - sum |v|^2) / 2
        pairwise = 0.5 * (tf.reduce_sum(total * total, -1) - tf.reduce_sum(all_vectors * all_vectors, [1, 2]))
        linear = tf.reduce_sum(bias, axis=1)
        linear += tf.linalg.matvec(centred, tf.constant(self.dense_weights))
        return (pairwise + linear + self.intercept)[:, None]

    def _calibrate_intercept(self, n: int = 200_000) -> float:
        dense, ids, _, _ = self._sample(n, tf.constant([self.seed, -1], tf.int64))
        logit = self._teacher_logit(dense, ids).numpy().ravel().astype(np.float64)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if np.mean(1 / (1 + np.exp(-(logit + mid)))) < self.CLICK_RATE:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    # -- batches -----------------------------------------------------------------
    def batch(self, index, batch_size: int, split: str = "train", with_teacher: bool = False):
        dense, ids, labels, p = self._sample(batch_size, _seed(self.seed, split, index))
        features = {"dense": dense, "sparse": ids}
        if with_teacher:
            return features, labels, p[:, None]
        return features, labels

    def dataset(self, batch_size: int, num_batches: int, split: str = "train", start_batch: int = 0,
                order_seed: Optional[int] = None, with_teacher: bool = False) -> tf.data.Dataset:
        return _batched(lambda i: self.batch(i, batch_size, split, with_teacher), num_batches, start_batch,
                        order_seed)

    # -- raw rows (tfdlrm generate) ---------------------------------------------------------
    # TensorFlow draws the random numbers (stateless: the same numbers on any machine); numpy
    # turns them into rows and the teacher's probability, in the same world (Zipf exponents, id
    # bijections, teacher) as _draw and _teacher_logit but about three times faster on a CPU.
    def raw_sample(self, batch_size: int, seed, dense_missing: float = 0.0, categorical_missing: float = 0.0):
        """Raw rows as Criteo's logs hold them (``tfdlrm generate``), as numpy: ``(counts int64
        [batch, num_dense], ids int64 [batch, tables], dense_missing bool, categorical_missing bool,
        labels float32 [batch], p float32 [batch])``.  The teacher sees what the converter makes
        of the row: a missing count as 0 (log1p(0)), a missing categorical value as nothing (its
        vector and bias left out)."""
        return self.raw_rows(self.raw_draws(batch_size, seed), dense_missing, categorical_missing)

    def raw_draws(self, batch_size: int, seed) -> tuple:
        """The random numbers of ``batch_size`` raw rows, numpy arrays with a row per row: the
        normals of the counts (float32), uniforms of the zero counts, ids (float64), labels,
        missing counts and missing values."""
        if getattr(self, "_raw_functions", None) is None:
            self._raw_functions = {}
        if batch_size not in self._raw_functions:  # one graph a shape: its ops run in parallel
            self._raw_functions[batch_size] = tf.function(lambda s: self._raw_draws(batch_size, s))
        return tuple(t.numpy() for t in self._raw_functions[batch_size](tf.convert_to_tensor(seed, tf.int64)))

    def _raw_draws(self, batch_size: int, seed):
        s_dense, s_zero, s_ids, s_label, s_dm, s_cm = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
        dense, tables = [batch_size, self.num_dense], [batch_size, len(self.table_rows)]
        return (tf.random.stateless_normal(dense, seed=s_dense), tf.random.stateless_uniform(dense, seed=s_zero),
                tf.random.stateless_uniform(tables, seed=s_ids, dtype=tf.float64),
                tf.random.stateless_uniform([batch_size], seed=s_label),
                tf.random.stateless_uniform(dense, seed=s_dm), tf.random.stateless_uniform(tables, seed=s_cm))

    def raw_rows(self, draws: tuple, dense_missing: float, categorical_missing: float) -> tuple:
        """:meth:`raw_sample` of the rows of ``draws`` (any rows of :meth:`raw_draws`, e.g. a slice)."""
        normal, u_zero, u_ids, u_label, u_dm, u_cm = draws
        d_miss, c_miss = u_dm < dense_missing, u_cm < categorical_missing
        counts = np.exp(self.dense_mu + self.dense_sigma * normal).astype(np.int64)  # the floor (> 0)
        np.multiply(counts, ~((u_zero < 0.2) | d_miss), out=counts)
        ids = self._raw_ids(u_ids)
        logit = self._raw_teacher_logit(np.log1p(counts.astype(np.float32)), ids, c_miss)
        with np.errstate(over="ignore"):
            p = 1 / (1 + np.exp(-logit))
        return counts, ids, d_miss, c_miss, (u_label < p).astype(np.float32), p

    def _raw_ids(self, u: np.ndarray) -> np.ndarray:
        """_draw's ids (int64) from its uniforms ``u`` (float64 [batch, tables]), in numpy."""
        c = self._raw_constants()
        x = np.power(c.zipf_scale * u + 1.0, c.zipf_power)  # the inverse CDF, as in _draw
        np.minimum(x, c.rows_float, out=x)  # and x >= 1: rank = floor(x) - 1
        ids = x.astype(np.uint32).astype(np.int64)
        ids *= self.multipliers
        ids += c.offsets_less_multipliers  # (rank + 1) * m + offset - m >= 0
        return _mod(ids, c.rows)

    def _raw_teacher_logit(self, dense: np.ndarray, ids: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """_teacher_logit(dense, ids, present=~missing)[:, 0] in numpy (float32 [batch]), up to
        float rounding: the sum over pairs is (|sum v|^2 - |dense v|^2) / 2 plus, per teacher row,
        bias - |v|^2 / 2.  Arrays are [tables, batch] (sums over tables add whole rows, in order),
        and a missing value reads row 0 of the tables, all zeros."""
        c = self._raw_constants()
        index = _mod(np.ascontiguousarray(ids.T, np.uint32), c.teacher_rows)
        index += c.teacher_offsets  # + 1: after the zero row
        index *= ~missing.T
        index = index.astype(np.intp)
        total = np.take(c.vectors, index).view(np.float32).reshape(*index.shape, self.TEACHER_DIM).sum(axis=0)
        own = np.take(c.own, index).sum(axis=0)
        centred = np.ascontiguousarray(dense.T)
        centred -= 1.5
        centred /= 1.5
        dense_terms = c.dense_matrix[0][:, None] * centred[0]  # [k + 1, batch]: projection, weight
        for j in range(1, len(centred)):
            dense_terms += c.dense_matrix[j][:, None] * centred[j]
        dense_vec = dense_terms[:-1]
        total += dense_vec.T
        pairwise = 0.5 * ((total * total).sum(axis=1) - (dense_vec * dense_vec).sum(axis=0))
        return pairwise + own + dense_terms[-1] + np.float32(self.intercept)

    def _raw_constants(self) -> SimpleNamespace:
        """The raw path's numpy forms of the world, made on first use."""
        constants = getattr(self, "_raw_constants_", None)
        if constants is None:  # idempotent: a race only makes it twice
            k, rows = self.TEACHER_DIM, np.array(self.table_rows, np.int64)
            one_minus_s = 1.0 - self.exponents
            vectors = np.concatenate([np.zeros((1, k), np.float32), self.teacher_vectors])
            v = self.teacher_vectors.astype(np.float64)
            own = np.concatenate([[0.0], self.teacher_bias - 0.5 * (v * v).sum(axis=1)]).astype(np.float32)
            constants = SimpleNamespace(
                rows=rows, rows_float=rows.astype(np.float64), offsets_less_multipliers=self.offsets - self.multipliers,
                zipf_scale=np.power(rows + 1.0, one_minus_s) - 1.0, zipf_power=1.0 / one_minus_s,
                teacher_rows=self.teacher_rows.astype(np.uint32)[:, None],
                teacher_offsets=(self.teacher_offsets + 1).astype(np.uint32)[:, None],
                vectors=vectors.view(np.dtype((np.void, vectors.itemsize * k))).ravel(), own=own,
                dense_matrix=np.concatenate([self.dense_projection, self.dense_weights[:, None]], 1))
            self._raw_constants_ = constants
        return constants


def _coprime_multiplier(rows: int, rng: np.random.Generator) -> int:
    """A multiplier coprime with ``rows``, so ``id -> (id * m + c) mod rows`` is a bijection."""
    if rows == 1:
        return 1
    while True:
        m = int(rng.integers(1, max(2, rows)))
        if math.gcd(m, rows) == 1:
            return m


def _mod(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``x % n`` (``x >= 0``; ``n`` > 0 of x's type, broadcast), in place; by one scalar when all
    ``n`` are equal (numpy divides by a scalar several times faster)."""
    if n.size and (n == n.flat[0]).all():
        d = n.dtype.type(n.flat[0])
        q = x // d
        q *= d
        x -= q
        return x
    return np.remainder(x, n, out=x)
