"""Hybrid parallelism (the paper's): tables on their planned devices, the dense part data-parallel.

Each step looks every table up on its device over the whole batch, splits the pooled
vectors by example (the all-to-all), runs the dense part per slice and sums the
gradients: one step equals the single-device step.  See docs/parallelism.md.
"""
from __future__ import annotations

import contextlib

from tfdlrm.parallel.plan import PlacementPlan


def _split_sizes(batch, parts: int):
    """Sizes of ``parts`` near-equal slices of ``batch`` examples (the first ones larger)."""
    import tensorflow as tf

    base, extra = batch // parts, batch % parts
    return base + tf.cast(tf.range(parts) < extra, batch.dtype)


class HybridRunner:
    """Tables placed by a :class:`PlacementPlan`, dense layers run on every device over a
    slice of the batch; see the module docstring.  ``model.fit`` calls :meth:`train_step`.
    """

    def __init__(self, plan: PlacementPlan):
        self.plan = plan

    @contextlib.contextmanager
    def scope(self):
        """Variables created inside land where the plan says: each table on its device (a
        split table as a ``ShardedVariable`` of per-device row shards), all else on the
        first device.  Build the model inside."""
        import tensorflow as tf
        from tensorflow.python.distribute.sharded_variable import ShardedVariable

        tables = {t.variable_name: t for t in self.plan.tables}
        dense_device = self.plan.dense_device

        def creator(next_creator, **kwargs):
            table = tables.get(kwargs.get("name"))
            if table is None:
                with tf.device(dense_device):
                    return next_creator(**kwargs)
            shape = kwargs.get("shape")
            if shape is not None and tuple(tf.TensorShape(shape).as_list()) != (table.rows, table.dim):
                raise ValueError(f"the plan has table {table.name} as [{table.rows}, {table.dim}], "
                                 f"the model creates {tf.TensorShape(shape)}")
            if not table.split:
                with tf.device(table.home):
                    return next_creator(**kwargs)
            # Initialise the whole table once (the same values as on one device), then
            # put each row shard on its device.
            value = kwargs["initial_value"]
            value = tf.convert_to_tensor(value() if callable(value) else value, dtype=kwargs.get("dtype"))
            shards = []
            for i, s in enumerate(table.shards):
                shard_kwargs = dict(kwargs, initial_value=value[s.start:s.stop], shape=(s.rows, table.dim),
                                    name=f"{kwargs['name']}/part_{i}")
                with tf.device(s.device):
                    shards.append(next_creator(**shard_kwargs))
            return ShardedVariable(shards, name=kwargs["name"])

        with tf.variable_creator_scope(creator):
            yield

    def forward(self, model, x, training=True):
        """Probabilities ``[batch, 1]`` for ``x``, computed over the plan's devices."""
        import tensorflow as tf

        from tfdlrm.models.batch import check_features

        dense, sparse = check_features(x, model.config, type(model).__name__)
        devices = self.plan.devices
        parts = len(devices)
        sizes = _split_sizes(tf.shape(dense, out_type=tf.int32)[0], parts)
        homes = self.plan.feature_homes()
        pooled = model.sparse_arch.lookup(sparse, devices=homes)  # per table, on its device
        slices = []  # slices[f][k]: table f's vectors for device k's examples, cut where f lives
        for home, vectors in zip(homes, pooled):
            with tf.device(home):
                slices.append(tf.split(vectors, sizes, num=parts, axis=0))
        dense_slices = tf.split(dense, sizes, num=parts, axis=0)
        logits = []
        for k, device in enumerate(devices):
            with tf.device(device):
                embedded = tf.stack([per_table[k] for per_table in slices], axis=1)  # [slice, tables, dim]
                logits.append(model.logits_from_embeddings(dense_slices[k], embedded, training=training))
        # The whole batch's logit, so loss and metrics are those of one device.
        return tf.keras.activations.sigmoid(tf.concat(logits, axis=0))

    def train_step(self, model, data):
        import tensorflow as tf

        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.forward(model, x, training=True)
        loss = model.compute_loss(x, y, y_pred, sample_weight)
        model._validate_target_and_loss(y, loss)  # noqa: SLF001 (what Model.train_step does)
        variables = model.trainable_variables
        # tf.gradients places each gradient op beside its forward op, so every device
        # runs the backward pass of its slice; a GradientTape leaves them unplaced.
        grads = tf.gradients(loss, variables)
        model.optimizer.apply_gradients(zip(grads, variables))
        return model.compute_metrics(x, y, y_pred, sample_weight)

    def test_step(self, model, data):
        import tensorflow as tf

        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.forward(model, x, training=False)
        model.compute_loss(x, y, y_pred, sample_weight)
        return model.compute_metrics(x, y, y_pred, sample_weight)
