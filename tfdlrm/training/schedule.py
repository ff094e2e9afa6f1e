"""The learning-rate schedule of MLPerf's DLRM reference, and the learning rate in each epoch's logs.

``LRPolicySchedule`` is facebookresearch/dlrm's ``LRPolicyScheduler`` (dlrm_s_pytorch.py,
``--lr-num-warmup-steps``, ``--lr-decay-start-step``, ``--lr-num-decay-steps``) as a tf_keras
``LearningRateSchedule``: the legacy optimizers evaluate it at their ``iterations``, so it is
checkpointed and resumed with them (the step counter is in every checkpoint).  See
docs/training.md, **Learning-rate schedule**.
"""
from __future__ import annotations

from typing import Optional, Union

import tensorflow as tf

from tfdlrm.errors import UserError

MIN_DECAY_LR = 1e-7  # the reference's floor during (and after) the decay


@tf.keras.utils.register_keras_serializable(package="tfdlrm")
class LRPolicySchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """The reference DLRM's learning rate at optimizer step ``step`` (0 for the first update).

    The reference evaluates its policy at the 1-based step count ``n = step + 1`` (PyTorch's
    ``_step_count``), base rate ``lr``, ``W`` warmup steps, decay from ``D`` over ``N`` steps:

    * ``n < W``: ``lr * (1 - (W - n) / W)``, i.e. ``lr * n / W`` (the first update uses ``lr / W``);
    * ``D <= n < D + N``: ``max(1e-7, lr * ((N - (n - D)) / N) ** 2)``, polynomial decay of power 2;
    * ``n >= D + N``: the last decay value, ``max(1e-7, lr / N**2)``, held (not 0);
    * ``W <= n < D``: the last warmup value, ``lr * (1 - 1 / W)``, held (the reference freezes its
      last rate; ``lr`` itself where there was no warmup step, ``W <= 1``, where the reference fails);
    * no decay (``N = 0``): ``lr`` from ``n = W`` on.

    ``decay_start_step`` defaults to ``warmup_steps`` (the decay follows the warmup); it may not
    come before the warmup's end (the reference exits: "Learning rate warmup must finish before
    the decay starts").  Computed in float64 and cast by the optimizer to the variables' dtype;
    the legacy optimizers pass the step as float32, exact up to 2**24 steps.
    """

    def __init__(self, learning_rate: float, warmup_steps: int = 0, decay_start_step: Optional[int] = None,
                 decay_steps: int = 0, name: Optional[str] = None):
        super().__init__()
        check_schedule(warmup_steps, decay_start_step, decay_steps, flags=False)
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
            raise UserError(f"learning rate must be a positive number, got {learning_rate!r}")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_start_step = int(warmup_steps if decay_start_step is None else decay_start_step)
        self.decay_steps = int(decay_steps)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or "LRPolicySchedule"):
            warmup, start, steps = self.warmup_steps, self.decay_start_step, self.decay_steps
            base = tf.constant(self.learning_rate, tf.float64)
            n = tf.cast(step, tf.float64) + 1.0
            rate = base
            if steps > 0:
                decayed = tf.minimum(n, float(start + steps - 1)) - start  # held at the last decay step
                decay = tf.maximum(tf.constant(MIN_DECAY_LR, tf.float64), base * tf.square((steps - decayed) / steps))
                held = base * (1.0 - (warmup - (warmup - 1)) / warmup) if warmup > 1 else base
                rate = tf.where(n >= start, decay, held)
            if warmup > 0:
                rate = tf.where(n < warmup, base * (1.0 - (warmup - n) / warmup), rate)
            return rate

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps,
                "decay_start_step": self.decay_start_step, "decay_steps": self.decay_steps, "name": self.name}

    def __repr__(self) -> str:
        return (f"LRPolicySchedule(learning_rate={self.learning_rate}, warmup_steps={self.warmup_steps}, "
                f"decay_start_step={self.decay_start_step}, decay_steps={self.decay_steps})")


def check_schedule(warmup_steps: int, decay_start_step: Optional[int], decay_steps: int, flags: bool = True) -> None:
    """One-line errors for schedule settings the reference refuses, and (``flags``) for flags
    that mean nothing: --decay-start-step without --decay-steps."""
    for flag, value in (("--warmup-steps", warmup_steps), ("--decay-steps", decay_steps),
                        ("--decay-start-step", decay_start_step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{flag} must be an integer >= 0, got {value!r}")
    if flags and decay_start_step is not None and decay_steps == 0:
        raise UserError(f"--decay-start-step {decay_start_step} needs --decay-steps N: the steps over which the "
                        f"learning rate decays")
    if decay_start_step is not None and decay_start_step < warmup_steps:
        raise UserError(f"--decay-start-step {decay_start_step} is before the warmup ends (--warmup-steps "
                        f"{warmup_steps}): the warmup must finish before the decay starts")


def scheduled_lr(lr: Optional[float], warmup_steps: int = 0, decay_start_step: Optional[int] = None,
                 decay_steps: int = 0) -> Union[None, float, LRPolicySchedule]:
    """``lr`` as a name-made optimizer takes it: the plain number without warmup or decay (as
    before schedules existed, bit for bit), else an :class:`LRPolicySchedule`; None stays None."""
    check_schedule(warmup_steps, decay_start_step, decay_steps)
    if lr is None or (warmup_steps == 0 and decay_steps == 0):
        return lr
    return LRPolicySchedule(lr, warmup_steps, decay_start_step, decay_steps)


def learning_rate_now(optimizer) -> Optional[float]:
    """The rate ``optimizer`` applied at its last step (its rate before any step), or None
    where it cannot be read."""
    try:
        value = optimizer._get_hyper("learning_rate") if hasattr(optimizer, "_get_hyper") else (  # noqa: SLF001
            optimizer.learning_rate)
        if isinstance(value, tf.keras.optimizers.schedules.LearningRateSchedule):
            value = value(max(int(optimizer.iterations.numpy()) - 1, 0))
        return float(tf.keras.backend.get_value(value))
    except (AttributeError, TypeError, ValueError, NotImplementedError, tf.errors.OpError):
        return None


class LearningRateLog(tf.keras.callbacks.Callback):
    """Put the learning rate of each epoch's last step into the epoch's logs, ``lr`` (and
    ``embedding_lr`` where the tables have an optimizer of their own), so that History,
    metrics.json's ``history`` and TensorBoard record it.  Place it before the
    callbacks that read the logs (TensorBoard, the checkpoints)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        optimizer = self.model.optimizer
        pairs = getattr(optimizer, "_optimizers_and_vars", None)  # TFRS CompositeOptimizer: tables first
        named = {"embedding_lr": pairs[0][0], "lr": pairs[1][0]} if pairs and len(pairs) == 2 else {"lr": optimizer}
        for key, opt in named.items():
            value = learning_rate_now(opt)
            if value is not None:
                logs[key] = value
