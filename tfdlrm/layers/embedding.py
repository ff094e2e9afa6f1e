"""SparseArch: one embedding table per categorical feature, with bag pooling."""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tfdlrm.layers.sharded import _device_of, _device_scope, _is_sharded, _whole, sharded_gather
from tfdlrm.layers.table_kinds import combine, part_ids, part_initializers
from tfdlrm.layers.table_kinds import uniform as table_initializer  # noqa: F401 (the public name)
from tfdlrm.presets import POOLINGS, default_feature_names
from tfdlrm.tables import specs_for

OUT_OF_RANGE = "tfdlrm: categorical id out of range"


class EmbeddingTables(tf.keras.layers.Layer):
    """One embedding table per categorical feature, each with its own row count.

    DLRM's SparseArch: every categorical feature ``f`` has its own table of
    ``rows[f]`` vectors of width ``dim``; each example's ids for ``f`` are looked up
    there and, for a bag of ids, pooled into one vector.

    Inputs (``int32``/``int64`` ids, ``features == len(rows)``):
      * ``[batch, features]``: one id per feature (the Criteo case);
      * ``[batch, features, k]``: fixed-size bags of ``k`` ids, pooled;
      * ragged ``[batch, features, None]``: variable-size bags, pooled.

    Output: ``float32 [batch, features, dim]``.  Bags are pooled by ``sum`` (the
    reference's EmbeddingBag default) or ``mean``; an empty bag gives zeros.

    Each table is its own variable ``[rows_f, dim]`` so that a placement plan can put
    it on a device of its own; lookups are ``tf.gather`` so gradients are
    ``IndexedSlices`` and the legacy optimizers update only the rows looked up.
    Each table's lookup and pooling run on the table's device.  A table may also be
    a ``ShardedVariable`` split by rows (a hybrid placement plan or
    ``ParameterServerStrategy`` creates those): ids are routed to the shard that
    holds their row, gathered there, and stitched back in order.

    With ``check_ids=True`` an id outside ``[0, rows_f)`` raises
    ``InvalidArgumentError`` naming the feature, its row count and the id, instead
    of the silent zero vector a GPU gather would give.  The check runs inside the
    graph and costs a few small ops per step.  An XLA cluster cannot raise, so the
    check splits in two: :meth:`out_of_range` (a boolean, compiles under XLA) and
    :meth:`raise_if_out_of_range` (the error, outside XLA).  The fast training step
    (``tfdlrm.models.fast_step``) computes the first inside its compiled lookup and raises before
    any variable changes; called inside someone else's XLA cluster, this layer skips
    the check (with a warning when traced).

    Args:
      rows: Sequence of ints, the number of rows of each table, one per categorical
        feature (``features == len(rows)``).  Must be non-empty and every entry
        positive.
      dim: Int, the width of every embedding vector (positive).
      pooling: String, how a bag of ids is pooled into one vector: ``"sum"``
        (default, the reference's EmbeddingBag default) or ``"mean"``.
      feature_names: Optional sequence of strings, one name per table; they name the
        table variables (``table_<name>``, what placement plans and checkpoints go
        by) and the feature in out-of-range errors.  Defaults to Criteo's
        ``C1, C2, ...``.
      check_ids: Boolean, whether to check that every id is in ``[0, rows_f)``
        (default ``True``; see above).
      qr_collisions, qr_operation, qr_threshold: Quotient-remainder tables (the
        reference's ``--qr-*``): with ``qr_collisions`` K >= 2, every table of more than
        ``qr_threshold`` rows (default 200) becomes a quotient table of ceil(rows / K)
        rows and a remainder table of K rows, an id's vector their rows' product
        (``"mult"``, default), sum (``"add"``) or concatenation (``"concat"``: every
        vector is then ``2 * dim`` wide).
      md_temperature, md_threshold, md_round_dims: Mixed dimensions (the reference's
        ``--md-*``): with a temperature in (0, 1], every table of more than
        ``md_threshold`` rows gets a width by the alpha-power rule and a learned
        projection back to ``dim`` (``tfdlrm.tables.md_dims``).
      memory_budget: Bytes of all tables at most: QR on the fewest, largest tables that
        fit (``tfdlrm.tables.specs_for``).

    The layout of every table (``specs``), the variables it makes and how they start
    are in ``tfdlrm/tables.py`` and ``table_kinds.py``; ``tables`` lists the row
    variables (a QR table's quotient and remainder as two), ``projections`` the MD
    projections (dense weights).  An id's vector is made from its rows before a bag
    is pooled, so bags pool exact per-id vectors.
      **kwargs: Passed to ``tf.keras.layers.Layer`` (``name``, ``dtype``, ...).

    Raises:
      ValueError: if ``rows`` is empty or has a non-positive entry, ``dim`` is not
        positive, ``pooling`` is unknown, or ``feature_names`` does not have one
        name per table.
    """

    def __init__(
        self,
        rows: Sequence[int],
        dim: int,
        pooling: str = "sum",
        feature_names: Optional[Sequence[str]] = None,
        check_ids: bool = True,
        qr_collisions: Optional[int] = None,
        qr_operation: str = "mult",
        qr_threshold: int = 200,
        md_temperature: Optional[float] = None,
        md_threshold: int = 200,
        md_round_dims: bool = False,
        memory_budget: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        rows = [int(r) for r in rows]
        if not rows:
            raise ValueError("EmbeddingTables needs at least one table (rows is empty).")
        bad = [(i, r) for i, r in enumerate(rows) if r <= 0]
        if bad:
            raise ValueError(f"every table needs at least one row; got rows={bad[0][1]} for table {bad[0][0]}.")
        if int(dim) <= 0:
            raise ValueError(f"embedding dim must be positive, got {dim}.")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        names = list(feature_names) if feature_names is not None else default_feature_names(len(rows))
        if len(names) != len(rows):
            raise ValueError(f"{len(names)} feature names for {len(rows)} tables.")
        self.rows = rows
        self.embedding_dim = int(dim)
        self.pooling = pooling
        self.feature_names = names
        self.check_ids = bool(check_ids)
        self.options = dict(qr_collisions=qr_collisions, qr_operation=qr_operation, qr_threshold=int(qr_threshold),
                            md_temperature=md_temperature, md_threshold=int(md_threshold),
                            md_round_dims=bool(md_round_dims), memory_budget=memory_budget)
        self.specs = specs_for(rows, self.embedding_dim, names, **self.options)
        self.dim = self.specs[0].dim  # every vector's width
        self.all_full = all(spec.kind == "full" for spec in self.specs)
        self.tables: list[tf.Variable] = []  # the row variables, in the specs' order
        self.projections: list = []  # per feature: its MD projection, or None
        self.parts_of: list[list[int]] = []  # per feature: the indices in ``tables`` of its row parts
        self.quantized = None  # :meth:`quantize`

    @property
    def num_features(self) -> int:
        return len(self.rows)

    def build(self, input_shape):
        features = input_shape[1] if len(input_shape) > 1 else None
        if features is not None and features != self.num_features:
            raise ValueError(
                f"expected ids for {self.num_features} categorical features, got {features} "
                f"(input shape {tuple(input_shape)})."
            )
        tables, projections, parts_of = [], [], []
        for spec in self.specs:
            parts_of.append([])
            projections.append(None)
            for part, initializer in zip(spec.parts, part_initializers(spec)):
                variable = self.add_weight(name=part.variable, shape=(part.rows, part.width),
                                           initializer=initializer, trainable=True)
                if part.rowwise:
                    parts_of[-1].append(len(tables))
                    tables.append(variable)
                else:
                    projections[-1] = variable
        self.tables, self.parts_of = tables, parts_of
        self.projections = projections
        super().build(input_shape)

    # -- id validation -------------------------------------------------------
    def _limits(self, ids, feature_of_value=None):
        rows = tf.constant(self.rows, dtype=ids.dtype)
        if feature_of_value is None:
            return tf.reshape(rows, [1, self.num_features] + [1] * (ids.shape.rank - 2))
        return tf.gather(rows, feature_of_value)

    def out_of_range(self, ids, feature_of_value=None):
        """A scalar bool: is any id outside ``[0, rows_f)``?  Plain comparisons, so it
        compiles under XLA (``ids`` as for :meth:`_validated`)."""
        limit = self._limits(ids, feature_of_value)
        return tf.reduce_any(tf.logical_or(ids < 0, ids >= limit))

    def raise_if_out_of_range(self, ids, bad=None, feature_of_value=None):
        """``ids``, after an assertion that fails, naming the first bad id's feature,
        when ``bad`` (default: :meth:`out_of_range`) is true.  Not XLA-compatible (it
        builds a string): run it outside the compiled part of a step."""
        if bad is None:
            bad = self.out_of_range(ids, feature_of_value)
        rows = tf.constant(self.rows, dtype=ids.dtype)

        def fail():
            limit = self._limits(ids, feature_of_value)
            flat_bad = tf.reshape(tf.logical_or(ids < 0, ids >= limit), [-1])
            first = tf.argmax(tf.cast(flat_bad, tf.int32), output_type=tf.int64)
            bad_id = tf.reshape(ids, [-1])[first]
            if feature_of_value is None:
                per_row = tf.reduce_prod(tf.shape(ids, out_type=tf.int64)[1:])
                inner = tf.reduce_prod(tf.shape(ids, out_type=tf.int64)[2:])
                feature = (first % per_row) // inner
            else:
                feature = tf.cast(feature_of_value[first], tf.int64)
            rows_f = tf.strings.as_string(tf.gather(rows, feature))
            message = tf.strings.join([
                OUT_OF_RANGE, ": feature ", tf.gather(tf.constant(self.feature_names), feature),
                " (table ", tf.strings.as_string(feature), ") has ", rows_f,
                " rows, so ids must be in [0, ", rows_f, "), got id ", tf.strings.as_string(bad_id),
            ])
            with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
                return tf.identity(ids)

        return tf.cond(bad, fail, lambda: ids)

    def _validated(self, ids, feature_of_value=None):
        """Return ``ids`` guarded by an assertion that every id is in range.

        ``ids`` is the flat (or ``[batch, features(, k)]``) id tensor;
        ``feature_of_value`` gives each id's feature when ``ids`` is flat.  Inside an
        XLA cluster, which cannot raise, the check is skipped (see the class docstring).
        """
        if _in_xla_context():
            _warn_unchecked_once(self.name)
            return ids
        return self.raise_if_out_of_range(ids, feature_of_value=feature_of_value)

    # -- lookup ----------------------------------------------------------------
    def call(self, ids):
        """Looks up and pools every feature's ids in its table.

        Args:
          ids: ``int32``/``int64`` ids, ``[batch, features]`` (one id per feature),
            ``[batch, features, k]`` (fixed-size bags) or ragged
            ``[batch, features, None]`` (variable-size bags).

        Returns:
          ``float32 [batch, features, dim]``: one (pooled) embedding vector per
          feature; an empty bag gives zeros.

        Raises:
          InvalidArgumentError: with ``check_ids=True`` (outside an XLA cluster),
            when an id is outside ``[0, rows_f)``.
        """
        return tf.stack(self.lookup(ids), axis=1)  # [batch, features, dim]

    def lookup(self, ids, devices: Optional[Sequence[Optional[str]]] = None) -> list:
        """One pooled ``[batch, dim]`` tensor per table; ``call`` stacks them into
        ``[batch, features, dim]``.  ``ids`` as for :meth:`call`.

        Table ``f``'s lookup and pooling run on ``devices[f]``; by default on the
        table's own device (a row-split table's shards each gather on their device
        and the rows are pooled on the caller's device).
        """
        if devices is None:
            devices = [_device_of(self.tables[self.parts_of[f][0]]) for f in range(self.num_features)]
        if len(devices) != self.num_features:
            raise ValueError(f"{len(devices)} devices for {self.num_features} tables.")
        if isinstance(ids, tf.RaggedTensor):
            return self._lookup_ragged(ids, devices)
        ids = tf.convert_to_tensor(ids)
        if not ids.dtype.is_integer:
            raise ValueError(f"categorical ids must be int32 or int64, got {ids.dtype.name}.")
        if ids.shape.rank not in (2, 3):
            raise ValueError(
                f"categorical ids must be [batch, features] or [batch, features, k], got shape {ids.shape}."
            )
        if self.check_ids:
            ids = self._validated(ids)
        columns = tf.unstack(ids, num=self.num_features, axis=1)
        pooled = []
        for f, column in enumerate(columns):
            with _device_scope(devices[f]):
                vectors = self.vectors(f, column)  # [batch, dim] or [batch, k, dim]
                if ids.shape.rank == 3:
                    vectors = (tf.reduce_sum if self.pooling == "sum" else tf.reduce_mean)(vectors, axis=1)
            pooled.append(vectors)
        return pooled

    def vectors(self, feature: int, ids):
        """Each id's vector (any shape of ids) in table ``feature``: ``ids.shape + [dim]``; each row
        part gathered on its own device (a row-split part shard by shard)."""
        rows = []
        for index, part in zip(self.parts_of[feature], part_ids(self.specs[feature], ids)):
            table = self.tables[index]
            if self.quantized is not None and self.quantized[index] is not None:  # layers/quantized.py
                rows.append(self.quantized[index].gather(part))
                continue
            with _device_scope(_device_of(table)):
                rows.append(tf.gather(table, part) if not _is_sharded(table) else sharded_gather(table.variables, part))
        return combine(self.specs[feature], rows, _whole(self.projections[feature]))

    def quantize(self, bits: int) -> list:
        """Look rows up from row-wise quantized copies of the tables from now on (``bits`` 8 or 4;
        :class:`tfdlrm.layers.quantized.QuantizedRows`), for prediction and serving; returns them (one
        per row variable, in ``tables`` order; None for a table kept float32 because its rows are too
        narrow to shrink: a per-row scale and bias outweigh the codes of a row of 1 or 2 values at 8
        bits).  ``bits=None`` goes back to the float tables."""
        if bits is None:
            self.quantized = None
            return []
        from tfdlrm.layers.quantized import QuantizedRows, quantized_row_bytes, variable_name

        self.quantized = [
            QuantizedRows(table.numpy(), bits, name=variable_name(table))
            if quantized_row_bytes(int(table.shape[1]), bits) < 4 * int(table.shape[1]) else None
            for table in self.tables]
        return self.quantized

    def _pool(self, vectors, bags: bool):
        if not bags:
            return vectors
        return (tf.reduce_sum if self.pooling == "sum" else tf.reduce_mean)(vectors, axis=1)

    def embed(self, ids):
        """``[batch, features, dim]`` for dense ids (one-hot or fixed bags), with no id
        check and no device placement: the part of :meth:`call` that a compiled
        (XLA) step runs.  Ids must already be known to be in range."""
        if not self.all_full:
            return self.embed_from_rows(self.part_rows(ids)[0])
        pooled = []
        for f, table in enumerate(self.tables):
            pooled.append(self._pool(tf.gather(table, ids[:, f]), ids.shape.rank == 3))  # [batch, dim]
        return tf.stack(pooled, axis=1)

    # -- the fast step's view of tables that are not all full: rows of each part, then the vectors --
    def part_rows(self, ids) -> tuple[list, list]:
        """For dense ids ``[batch, features(, k)]`` (in range, no placement): each row variable's
        gathered rows ``[batch(, k), width]`` and the ids it gathered, in ``tables`` order."""
        rows, indices = [], []
        for f, spec in enumerate(self.specs):
            for index, part in zip(self.parts_of[f], part_ids(spec, ids[:, f])):
                rows.append(tf.gather(self.tables[index], part))
                indices.append(part)
        return rows, indices

    def embed_from_rows(self, rows: list):
        """``[batch, features, dim]`` from :meth:`part_rows`' rows: each id's vector, then the bags pooled."""
        pooled = []
        for f, spec in enumerate(self.specs):
            vectors = combine(spec, [rows[i] for i in self.parts_of[f]], self.projections[f])
            pooled.append(self._pool(vectors, vectors.shape.rank == 3))
        return tf.stack(pooled, axis=1)

    def row_gradients(self, grads: list, indices: list) -> list:
        """One ``IndexedSlices`` a row variable from the gradients of :meth:`part_rows`' rows."""
        out = []
        for table, g, index in zip(self.tables, grads, indices):
            width = table.shape[1]
            out.append(tf.IndexedSlices(tf.reshape(tf.cast(g, table.dtype), [-1, width]), tf.reshape(index, [-1]),
                                        dense_shape=tf.shape(table, out_type=index.dtype)))
        return out

    def sparse_gradients(self, grad, ids) -> list:
        """The tables' gradients, one ``IndexedSlices`` per table, from ``grad`` =
        d(loss)/d(:meth:`embed` output) ``[batch, features, dim]``: exactly what
        differentiating through the gathers gives, without a tape over the tables.
        Each bag's gradient goes to every id in the bag (divided by the bag size for
        ``mean``).  ``grad`` and ``ids`` may also come split by feature already (lists of
        ``[batch, dim]`` and ``[batch(, k)]``: ``tf.unstack(..., axis=1)``).  Full tables only
        (:meth:`row_gradients` for the others)."""
        if not self.all_full:
            raise ValueError("sparse_gradients is for full tables; use part_rows and row_gradients")
        grads = []
        columns = ids if isinstance(ids, (list, tuple)) else tf.unstack(ids, num=self.num_features, axis=1)
        rows = grad if isinstance(grad, (list, tuple)) else tf.unstack(grad, num=self.num_features, axis=1)
        for table, g, index in zip(self.tables, rows, columns):
            g = tf.cast(g, table.dtype)  # [batch, dim]
            if index.shape.rank == 2:
                k = index.shape[1] if index.shape[1] is not None else tf.shape(index)[1]
                if self.pooling == "mean":
                    g = g / tf.cast(k, g.dtype)
                g = tf.reshape(tf.broadcast_to(g[:, None, :], [tf.shape(g)[0], k, self.dim]), [-1, self.dim])
                index = tf.reshape(index, [-1])
            grads.append(tf.IndexedSlices(g, index, dense_shape=tf.shape(table, out_type=index.dtype)))
        return grads

    def _lookup_ragged(self, ids: tf.RaggedTensor, devices):
        if not ids.dtype.is_integer:
            raise ValueError(f"categorical ids must be int32 or int64, got {ids.dtype.name}.")
        if ids.ragged_rank != 2 or ids.shape.rank != 3:
            raise ValueError(
                f"multi-hot ids must be ragged [batch, features, None], got {ids.shape} "
                f"with ragged_rank {ids.ragged_rank}."
            )
        # ids.values: [batch * features, None]; row r belongs to feature r % features.
        bags = ids.values
        if self.check_ids:
            feature_of_bag = tf.math.floormod(tf.range(bags.nrows()), self.num_features)
            feature_of_value = tf.gather(feature_of_bag, bags.value_rowids())
            bags = bags.with_flat_values(self._validated(bags.flat_values, feature_of_value))
        # Bag of feature f for example b is row b * features + f.
        bag_index = tf.reshape(tf.range(bags.nrows()), [-1, self.num_features])
        pooled = []
        for f in range(self.num_features):
            with _device_scope(devices[f]):
                feature_bags = tf.gather(bags, bag_index[:, f])  # ragged [batch, None]
                vectors = feature_bags.with_flat_values(self.vectors(f, feature_bags.flat_values))
                summed = tf.reduce_sum(vectors, axis=1)  # [batch, dim]
                if self.pooling == "mean":
                    counts = tf.cast(feature_bags.row_lengths(), summed.dtype)
                    summed = summed / tf.maximum(counts, 1.0)[:, None]
            pooled.append(summed)
        return pooled

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], self.num_features, self.dim])

    def get_config(self):
        config = super().get_config()
        config.update(
            rows=list(self.rows),
            dim=self.embedding_dim,
            pooling=self.pooling,
            feature_names=list(self.feature_names),
            check_ids=self.check_ids,
            **self.options,
        )
        return config


# -- XLA --------------------------------------------------------------------------------
def _in_xla_context() -> bool:
    """True while tracing inside a ``jit_compile`` function (or an XLA cluster)."""
    from tensorflow.python.ops import control_flow_util

    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


_WARNED_UNCHECKED: set = set()


def _warn_unchecked_once(name: str) -> None:
    if name not in _WARNED_UNCHECKED:
        _WARNED_UNCHECKED.add(name)
        import warnings

        warnings.warn(f"{name}: categorical ids are not range-checked inside an XLA cluster (XLA cannot raise); "
                      f"out-of-range ids are clamped there. tfdlrm's models check ids before their compiled "
                      f"steps; check them yourself when you compile the layer in your own function.",
                      stacklevel=3)
