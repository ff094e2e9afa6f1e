"""The fast one-device training step that ``model.fit`` runs (``--xla``, ``--mixed-precision``).

Embedding gathers and row updates are compiled by XLA (``xla="sparse"``), the MLPs run
in TensorFlow/oneDNN (bfloat16 where the CPU has it); ids are range-checked before any
update.  ``xla="full"`` compiles the whole step, ``xla="off"`` is Keras's stock step.
The profiles behind this split are in docs/benchmarks.md.
"""
from __future__ import annotations

import functools
from typing import Optional

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.presets import AUTO, MIXED_PRECISIONS, XLA_MODES


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (``avx512_bf16`` or AMX)?  Only then is
    bf16 faster than float32 here; elsewhere oneDNN emulates it, slowly."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_mixed_precision(value: Optional[str]) -> Optional[str]:
    """``auto`` -> ``bf16`` on a CPU with native bfloat16 and no GPU, else off;
    ``bf16``; ``off``/None.  Returns ``"bf16"`` or None."""
    if value in (None, "off", "float32", "fp32"):
        return None
    if value == "bf16":
        return "bf16"
    if value == AUTO:
        return "bf16" if native_bf16() and not tf.config.list_physical_devices("GPU") else None
    raise UserError(f"unknown mixed precision {value!r}; choose one of: auto, {', '.join(MIXED_PRECISIONS)}")


def resolve_xla(value: Optional[str], parallel_mode: Optional[str] = None) -> str:
    """``auto`` -> ``sparse`` on one device (``parallel_mode`` none/None), else ``off``
    (multi-device steps are built by ``tfdlrm.parallel``, not compiled)."""
    if value is None or value == AUTO:
        return "sparse" if parallel_mode in (None, "none") else "off"
    if value not in XLA_MODES:
        raise UserError(f"unknown --xla mode {value!r}; choose one of: auto, {', '.join(XLA_MODES)}")
    if value != "off" and parallel_mode not in (None, "none"):
        raise UserError(f"--xla {value} applies to one device; --parallel {parallel_mode} builds its own step "
                        f"(use --xla off)")
    return value


def use_fast_step(model, xla: str = "sparse") -> None:
    """Make ``model.fit`` use the fast step (``xla`` sparse or full), or the stock one (off).  ``train``
    sets ``model.fast_step.batch_size`` when an epoch also has a batch of another size
    (:class:`FastTrainStep`)."""
    if xla not in XLA_MODES:
        raise UserError(f"unknown --xla mode {xla!r}; choose one of: {', '.join(XLA_MODES)}")
    if xla == "full" and getattr(model, "optimizer", None) is not None and sparse_update_kind(model.optimizer) is None:
        raise UserError(f"--xla full compiles the optimizer too, which works for sgd (no momentum) and adagrad "
                        f"without gradient clipping, not this {type(model.optimizer).__name__}; use --xla sparse")
    model.fast_step = None if xla == "off" else FastTrainStep(xla)
    model.train_function = None  # Keras traces its train function again


def sparse_update_kind(optimizer) -> Optional[str]:
    """``sgd`` or ``adagrad`` when the fast step can apply ``optimizer`` inside XLA, else None (also for
    an optimizer that clips gradients: the compiled row updates do not clip, TensorFlow's apply does)."""
    legacy = tf.keras.optimizers.legacy
    if any(getattr(optimizer, name, None) is not None for name in ("clipnorm", "clipvalue", "global_clipnorm")):
        return None
    if type(optimizer) is legacy.SGD and not optimizer._momentum and not optimizer.nesterov:  # noqa: SLF001
        return "sgd"
    if type(optimizer) is legacy.Adagrad:
        return "adagrad"
    return None


class FastTrainStep:
    """``model.train_step`` for one device; see the module docstring.  ``mode`` is
    ``sparse`` (gathers and updates compiled) or ``full`` (the whole step compiled)."""

    def __init__(self, mode: str = "sparse", batch_size: Optional[int] = None):
        if mode not in ("sparse", "full"):
            raise ValueError(f"FastTrainStep mode must be sparse or full, got {mode!r}")
        self.mode = mode
        # With ``batch_size`` (sparse mode): a batch of another size (an epoch's short or folded last
        # batch) takes the lookup and the row update uncompiled (:meth:`_run`).
        self.batch_size = batch_size
        self._functions: dict = {}
        self.compiled_functions: list = []  # the jit_compile tf.functions, for tests and reports

    # Which batches and models the fast step takes; the stock step takes the rest.
    @staticmethod
    def applies(model, x) -> bool:
        if getattr(model, "parallel_runner", None) is not None or tf.distribute.has_strategy():
            return False
        if not isinstance(x, dict) or isinstance(x.get("sparse"), (tf.RaggedTensor, tf.SparseTensor)):
            return False
        layer = model.sparse_arch
        if any(getattr(t, "is_sharded_variable", False) for t in layer.tables):
            return False
        sparse = x.get("sparse")
        rank = getattr(getattr(sparse, "shape", None), "rank", None)
        return rank in (2, 3)

    @tf.autograph.experimental.do_not_convert
    def train_step(self, model, data):
        """The step's metrics, or None when the batch or model is not for the fast step.

        Not converted by AutoGraph (nothing in it branches on a tensor): converting the step's
        code, the layers' and the optimizer's took about 2 s of the first call's 4.7 at batch
        128, inside the training clock."""
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        if not self.applies(model, x):
            return None
        from tfdlrm.models.batch import check_features

        dense, sparse = check_features(x, model.config, type(model).__name__)
        sparse = tf.convert_to_tensor(sparse)
        if not sparse.dtype.is_integer:
            raise ValueError(f"categorical ids must be int32 or int64, got {sparse.dtype.name}.")
        layer = model.sparse_arch
        if self.mode == "sparse":
            embedded, bad = self._run(model, "lookup", sparse, batch=tf.shape(sparse)[0])
            if layer.check_ids:
                # Raises (naming the feature) before the update below, which needs its output.
                sparse = layer.raise_if_out_of_range(sparse, bad)
            # Full tables: the looked-up vectors [batch, tables, dim]; other kinds: each row part's rows
            # (a list), made into the vectors under the tape (row_ids: the ids each part gathered).
            row_ids = sparse
            if not layer.all_full:
                embedded, row_ids = embedded
                with tf.control_dependencies([sparse]):  # the ids' check before any row changes
                    row_ids = [tf.identity(index) for index in row_ids]
            y_pred, _, grads = _loss_and_gradients(model, x, dense, embedded, y, sample_weight)
            kind = sparse_update_kind(model.optimizer)
            if kind is None:
                self._function(model, "apply")(grads[:-1], grads[-1], row_ids)
            else:
                # The tables' rows by XLA, the dense weights by TensorFlow's own update ops: each
                # of those runs as soon as its gradient is ready, beside the rest of the backward
                # pass, where one compiled update of everything waited for the last gradient.
                lr = learning_rate(model.optimizer, layer.tables[0].dtype)  # before the step counter moves
                self._run(model, "rows", *row_arguments(grads[-1], row_ids, kind, lr), lr, batch=tf.shape(sparse)[0])
                with tf.control_dependencies([sparse]):  # the ids' check first: a bad id changes nothing
                    model.optimizer.apply_gradients(zip(grads[:-1], model.dense_variables))
        else:
            if layer.check_ids:
                sparse = layer.raise_if_out_of_range(sparse)
            y_pred = self._function(model, "full")(x, dense, sparse, y, sample_weight)
        return model.compute_metrics(x, y, y_pred, sample_weight)

    # -- the compiled parts --------------------------------------------------------------------------------------
    def _function(self, model, name: str):
        if name not in self._functions:
            _create_slots(model)
            base, _, plain = name.partition(":")
            make = {"lookup": self._make_lookup, "rows": self._make_rows, "apply": self._make_apply,
                    "full": self._make_full}[base]
            fn, compiled = make(model)
            if plain:  # the same function, uncompiled
                fn, compiled = tf.function(fn.python_function, reduce_retracing=True, autograph=False), False
            self._functions[name] = fn
            if compiled:
                self.compiled_functions.append(fn)
        return self._functions[name]

    def _run(self, model, name: str, *args, batch):
        """``name``'s compiled function, or on a batch that is not :attr:`batch_size` rows, the same code
        uncompiled: XLA compiles anew for every shape (0.3-0.5 s a function), which an epoch's one
        short or folded last batch would pay inside the training time."""
        fn = self._function(model, name)
        if self.batch_size is None or fn not in self.compiled_functions:
            return fn(*args)
        plain = self._function(model, name + ":plain")
        return tf.cond(tf.equal(batch, self.batch_size), lambda: fn(*args), lambda: plain(*args))

    @staticmethod
    def _make_lookup(model):
        """One-hot ids: the gathers compiled by XLA (a few rows each, where TensorFlow's
        per-op cost dominates).  Bags (``ids_per_lookup > 1``): TensorFlow's gather, which
        copies whole rows, then the bag sums compiled by XLA; XLA's CPU gather fused with
        the sum went element by element (2.3x slower for 100 ids x 64 floats) and
        TensorFlow's sum over the bag axis took twice XLA's time."""
        layer = model.sparse_arch
        if not layer.all_full:
            # QR/MD tables: each row part's rows and ids (combined into vectors under the step's tape);
            # compiled for one-hot ids, TensorFlow's gather for bags (as below).
            def parts(ids):
                if layer.check_ids and ids.shape.rank == 3:
                    ids = layer.raise_if_out_of_range(ids)
                    return layer.part_rows(ids), tf.constant(False)
                return layer.part_rows(ids), layer.out_of_range(ids)

            one_hot = model.config.ids_per_lookup == 1
            return tf.function(parts, jit_compile=one_hot, reduce_retracing=True, autograph=False), one_hot
        if model.config.ids_per_lookup == 1:
            def lookup(ids):
                return layer.embed(ids), layer.out_of_range(ids)

            return tf.function(lookup, jit_compile=True, reduce_retracing=True, autograph=False), True

        def pool(rows):  # per table [batch, k, dim] -> [batch, tables, dim]
            reduce = tf.reduce_sum if layer.pooling == "sum" else tf.reduce_mean
            return tf.stack([reduce(r, axis=1) for r in rows], axis=1)

        pool = tf.function(pool, jit_compile=True, reduce_retracing=True, autograph=False)

        def lookup_bags(ids):
            if layer.check_ids:  # before TensorFlow's gather, whose own error names no feature
                ids = layer.raise_if_out_of_range(ids)
            rows = [tf.gather(table, ids[:, f]) for f, table in enumerate(layer.tables)]
            return pool(rows), tf.constant(False)

        lookup_bags.pool = pool
        return tf.function(lookup_bags, reduce_retracing=True, autograph=False), False

    @staticmethod
    def _make_rows(model):
        """The tables' row updates (SGD or Adagrad), compiled: ``rows(values, ids, lr)`` with the
        lists of :func:`row_arguments`."""
        kind = sparse_update_kind(model.optimizer)

        def rows(values, ids, lr):
            apply_table_rows(model, values, ids, kind, lr)
            return tf.constant(True)  # something to return, for tf.cond

        return tf.function(rows, jit_compile=True, reduce_retracing=True, autograph=False), True

    @staticmethod
    def _make_apply(model):
        """Any other optimizer: one ``apply_gradients`` of the dense weights and the tables' rows
        (``IndexedSlices``), not compiled."""
        def apply(dense_grads, embedded_grad, ids):
            layer = model.sparse_arch
            pairs = list(zip(dense_grads, model.dense_variables))
            model.optimizer.apply_gradients(pairs + list(zip(table_gradients(layer, embedded_grad, ids), layer.tables)))

        return tf.function(apply, reduce_retracing=True, autograph=False), False

    @staticmethod
    def _make_full(model):
        kind = sparse_update_kind(model.optimizer)
        if kind is None:
            raise UserError(f"--xla full compiles the optimizer too, which works for sgd (no momentum) and "
                            f"adagrad, not {type(model.optimizer).__name__}; use --xla sparse")

        def full(x, dense, ids, y, sample_weight):
            layer = model.sparse_arch
            if layer.all_full:
                embedded, row_ids = layer.embed(ids), ids
            else:
                embedded, row_ids = layer.part_rows(ids)
            y_pred, _, grads = _loss_and_gradients(model, x, dense, embedded, y, sample_weight)
            apply_gradients(model, grads[:-1], grads[-1], row_ids, kind)
            return y_pred

        return tf.function(full, jit_compile=True, reduce_retracing=True, autograph=False), True


def _loss_and_gradients(model, x, dense, embedded, y, sample_weight):
    """Forward from looked-up ``embedded`` [batch, tables, dim] (or, for tables that are not all full,
    the list of each row part's gathered rows); returns (y_pred, loss, grads) with grads in
    ``model.dense_variables`` order followed by d loss / d embedded (a list for a list)."""
    with tf.GradientTape() as tape:
        tape.watch(embedded)
        vectors = embedded if model.sparse_arch.all_full else model.sparse_arch.embed_from_rows(embedded)
        logits = model.logits_from_embeddings(dense, vectors, training=True, compiled_parts=True)
        y_pred = tf.keras.activations.sigmoid(logits)
        loss = model.compute_loss(x, y, y_pred, sample_weight)
    model._validate_target_and_loss(y, loss)  # noqa: SLF001 (what Model.train_step does)
    return y_pred, loss, tape.gradient(loss, model.dense_variables + [embedded])


def _create_slots(model) -> None:
    """The optimizer's slots, made now (outside any compiled function), as Keras's
    first ``apply_gradients`` would."""
    optimizer = model.optimizer
    with tf.init_scope():
        pairs = getattr(optimizer, "_optimizers_and_vars", None)  # TFRS CompositeOptimizer
        if pairs:
            for opt, variables in pairs:
                opt._create_all_weights(list(variables()))  # noqa: SLF001
        else:
            optimizer._create_all_weights(model.trainable_variables)  # noqa: SLF001


def learning_rate(optimizer, dtype):
    """The learning rate of the optimizer's next step, read before ``apply_gradients`` moves its step
    counter on (a schedule's rate depends on it)."""
    return tf.identity(optimizer._decayed_lr(dtype))  # noqa: SLF001


def apply_gradients(model, dense_grads, embedded_grad, ids, kind: str) -> None:
    """One optimizer step of the whole model (the fully compiled step): ``dense_grads`` for the dense
    weights (in ``model.dense_variables`` order) by the optimizer, ``embedded_grad`` = d loss / d
    embedded for the tables' rows by :func:`apply_table_rows`."""
    lr = learning_rate(model.optimizer, model.sparse_arch.tables[0].dtype)
    apply_table_rows(model, *row_arguments(embedded_grad, ids, kind, lr), kind, lr)
    model.optimizer.apply_gradients(list(zip(dense_grads, model.dense_variables)))


def row_arguments(embedded_grad, ids, kind: str, lr) -> tuple[list, list]:
    """What :func:`apply_table_rows` takes, split by table: SGD's steps (``lr x`` the gradient) or
    Adagrad's gradients, and the ids.  Made outside the compiled row update (one multiply and one
    ``Unpack`` each), that function holds only the tables' scatters: it compiled 2.5x faster (0.3 s
    against 0.8-1.0 s at batch 128-192, 26 tables) and ran faster (0.47 against 0.79 ms at 2048)
    than with the slices and products inside."""
    if isinstance(embedded_grad, (list, tuple)):  # tables not all full: per row part already
        return [lr * g if kind == "sgd" else g for g in embedded_grad], list(ids)
    values = lr * embedded_grad if kind == "sgd" else embedded_grad
    return tf.unstack(values, axis=1), tf.unstack(ids, axis=1)


def table_gradients(layer, values, ids) -> list:
    """One ``IndexedSlices`` a row variable: from d loss / d vectors for full tables, from each row
    part's gradients otherwise (lists, as :func:`row_arguments` gives them)."""
    if layer.all_full:
        return layer.sparse_gradients(values, ids)
    return layer.row_gradients(values, ids)


def apply_table_rows(model, values, ids, kind: str, lr) -> None:
    """The tables' part of an SGD (``kind`` ``sgd``) or Adagrad (``adagrad``) step at learning rate
    ``lr``, on the looked-up rows only, in a form XLA compiles, from :func:`row_arguments`: SGD
    subtracts each row's step (duplicate ids add up, as the legacy SGD's scatter-add of
    ``IndexedSlices``); Adagrad as ``ResourceSparseApplyAdagradV2`` (whose TensorFlow kernel has no
    XLA version).  The step counter is the dense update's to move."""
    layer = model.sparse_arch
    table_grads = table_gradients(layer, values, ids)
    if kind == "sgd":
        for table, step in zip(layer.tables, table_grads):
            table.scatter_sub(step)
        return
    if kind != "adagrad":
        raise ValueError(f"no compiled row update for {kind!r}")
    optimizer = model.optimizer
    epsilon = tf.convert_to_tensor(optimizer.epsilon, lr.dtype)
    for table, grad in zip(layer.tables, table_grads):
        _adagrad_rows(table, optimizer.get_slot(table, "accumulator"), grad, lr, epsilon)


def _adagrad_rows(table, accumulator, grad: tf.IndexedSlices, lr, epsilon) -> None:
    """``ResourceSparseApplyAdagradV2`` on the rows of ``grad`` (duplicates summed first):
    ``acc += g * g; table -= lr * g / (sqrt(acc) + epsilon)``."""
    ids, values, valid = _sum_duplicates(grad.indices, grad.values)
    accumulator.scatter_add(tf.IndexedSlices(values * values, ids))
    acc = tf.gather(accumulator, ids)
    step = tf.where(valid[:, None], lr * values / (tf.sqrt(acc) + epsilon), tf.zeros_like(values))
    table.scatter_sub(tf.IndexedSlices(step, ids))


def _sum_duplicates(indices, values):
    """Static-shape ``tf.unique`` + segment sum, for XLA: ``(ids, sums, valid)`` with as
    many rows as ``indices``; the first ``unique`` rows are the distinct ids (ascending)
    with their summed values, the rest are padding (``valid`` false, values zero, id 0)."""
    n = tf.shape(indices)[0]
    order = tf.argsort(indices)
    sorted_ids = tf.gather(indices, order)
    first = tf.concat([[True], sorted_ids[1:] != sorted_ids[:-1]], axis=0)
    segment = tf.cumsum(tf.cast(first, tf.int32)) - 1
    sums = tf.math.unsorted_segment_sum(tf.gather(values, order), segment, n)
    ids = tf.math.unsorted_segment_sum(tf.where(first, sorted_ids, tf.zeros_like(sorted_ids)), segment, n)
    valid = tf.range(n) <= segment[-1]
    return ids, sums, valid
