"""``--parallel mirrored``: MirroredStrategy with the whole-batch loss, however the batch splits."""
from __future__ import annotations

from typing import Sequence

_MIRRORED: dict = {}


def mirrored_strategy(devices: Sequence[str]):
    """A ``MirroredStrategy`` over ``devices`` that reduces through the first device.

    TensorFlow's default all-reduce uses collective ops whose group and instance keys
    each new strategy numbers afresh: a second strategy in the same process (another
    run of ``compare``, another device count in ``bench``) then collides with the
    first ("Shape mismatch in the collective instance", "joining a group with size
    4, but that group has size 2").  ``ReductionToOneDevice`` has no such keys, and
    the same code runs on GPUs and CPUs.  One strategy is kept per device list.
    """
    import tensorflow as tf

    key = tuple(devices)
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(
            list(devices), cross_device_ops=tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0]))
    return _MIRRORED[key]


class MirroredRunner:
    """``model.fit`` under ``MirroredStrategy`` with the loss of the whole batch.

    Keras averages per-replica mean losses, which equals the whole batch's mean only
    when every replica gets as many examples; this step rescales each replica's loss
    to ``sum of its losses / examples in the global batch``, so a short last batch
    split unevenly is still one whole-batch step.
    """

    def train_step(self, model, data):
        import tensorflow as tf

        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight)  # replica mean / replicas
            context = tf.distribute.get_replica_context()
            replicas = context.num_replicas_in_sync
            if replicas > 1:
                local = tf.cast(tf.shape(y_pred)[0], loss.dtype)
                total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
                loss = loss * tf.math.divide_no_nan(replicas * local, total)
        model._validate_target_and_loss(y, loss)  # noqa: SLF001
        model.optimizer.minimize(loss, model.trainable_variables, tape=tape)
        return model.compute_metrics(x, y, y_pred, sample_weight)

    def test_step(self, model, data):
        import tensorflow as tf

        return tf.keras.Model.test_step(model, data)
