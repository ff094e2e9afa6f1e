"""One set-up per ``--parallel`` mode: devices configured, a scope to build in, a step to attach.

``with p.scope(): model = build_model(...); compile_model(model, ...)``, then ``p.attach(model)``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

from tfdlrm.errors import UserError
from tfdlrm.parallel.devices import device_names
from tfdlrm.parallel.hybrid import HybridRunner
from tfdlrm.parallel.mirrored import MirroredRunner, mirrored_strategy
from tfdlrm.parallel.plan import PlacementPlan, plan_for
from tfdlrm.parallel.ps import cluster_from_tf_config, ps_strategy, ps_table_scope
from tfdlrm.presets import PARALLEL_MODES, ModelConfig


def configure_devices(devices) -> list[str]:
    """Make the devices of ``devices`` (a count or a list) exist; return their names.

    Without GPUs a CPU device list needs the CPU split into logical devices, which is
    only possible before TensorFlow runs its first op: call this first in a process
    (the CLI does).  Later calls succeed when the devices already exist.
    """
    import tensorflow as tf

    names = device_names(devices)
    kind = names[0].split(":")[1]
    needed = max(int(n.rsplit(":", 1)[1]) for n in names) + 1
    physical = tf.config.list_physical_devices(kind)
    if kind == "GPU":
        if needed > len(physical):
            raise UserError(f"--devices asks for {needed} GPU(s) but this machine has {len(physical)}")
        return names
    if not physical:
        raise UserError("this machine shows no CPU device to TensorFlow")
    if len(tf.config.get_logical_device_configuration(physical[0]) or [None]) >= needed:
        return names
    try:
        tf.config.set_logical_device_configuration(
            physical[0], [tf.config.LogicalDeviceConfiguration() for _ in range(needed)])
    except RuntimeError:  # TensorFlow's runtime has started: its devices are fixed
        have = len(tf.config.list_logical_devices("CPU"))
        if have >= needed:
            return names
        raise UserError(
            f"{needed} CPU devices are needed but TensorFlow has already started with {have}; "
            f"call tfdlrm.parallel.configure_devices({needed}) before any TensorFlow op (a fresh process)"
        ) from None
    return names


@dataclass
class Parallel:
    """How a model is built, compiled and fed for one parallel mode.

    ``with p.scope(): model = build_model(...); compile_model(model, ...)``, then
    ``p.attach(model)``.
    """

    mode: str = "none"
    devices: list[str] = field(default_factory=list)
    plan: Optional[PlacementPlan] = None
    strategy: object = None
    runner: object = None
    cluster: dict = field(default_factory=dict)  # ps: the cluster's jobs and addresses

    @contextlib.contextmanager
    def scope(self):
        if self.mode == "hybrid":
            with self.runner.scope():
                yield
        elif self.mode == "mirrored":
            with self.strategy.scope():
                yield
        elif self.mode == "ps":
            with self.strategy.scope(), ps_table_scope():
                yield
        elif self.devices:
            import tensorflow as tf

            with tf.device(self.devices[0]):
                yield
        else:
            yield

    def attach(self, model):
        """Give the compiled model this mode's train step (hybrid, mirrored) and its
        optimizer slots (see :func:`create_optimizer_slots`); return the model."""
        if self.runner is not None:
            model.parallel_runner = self.runner
        if getattr(model, "optimizer", None) is not None:
            create_optimizer_slots(model)
        return model

    def describe(self) -> str:
        if self.mode == "none":
            return "one device"
        if self.mode == "ps":
            return f"parameter servers: {len(self.cluster['worker'])} worker(s), {len(self.cluster['ps'])} ps"
        return f"{self.mode} over {len(self.devices)} device(s): {', '.join(self.devices)}"


def make_parallel(mode: Optional[str] = None, devices=None, config: Optional[ModelConfig] = None,
                  budget: Optional[int] = None, model: str = "dlrm", cluster_resolver=None) -> Parallel:
    """Set up ``mode`` over ``devices`` (a count or list; configured if need be).

    ``mode=None`` means ``hybrid`` for more than one device, else ``none``.
    """
    if mode is not None and mode not in PARALLEL_MODES:
        raise UserError(f"unknown parallel mode {mode!r}; choose one of: {', '.join(PARALLEL_MODES)}")
    if mode == "ps":
        if devices is not None:
            raise UserError("--parallel ps takes its devices from TF_CONFIG's cluster; drop --devices")
        resolver = cluster_from_tf_config(cluster_resolver)
        return Parallel("ps", [], None, ps_strategy(resolver), None, cluster=resolver.cluster_spec().as_dict())
    if devices is None:
        if mode in (None, "none"):
            return Parallel("none")  # TensorFlow's own placement, as without this module
        devices = 1
    names = configure_devices(devices)
    if mode is None:
        mode = "hybrid" if len(names) > 1 else "none"
    if mode == "none":
        if len(names) > 1:
            raise UserError(f"--parallel none trains on one device but --devices names {len(names)}; "
                            f"use --parallel hybrid or mirrored")
        return Parallel("none", names)
    if mode == "mirrored":
        return Parallel("mirrored", names, None, mirrored_strategy(names), MirroredRunner())
    if config is None:
        raise ValueError("hybrid parallelism needs the model config for its placement plan")
    plan = plan_for(config, names, budget, model)
    return Parallel("hybrid", names, plan, None, HybridRunner(plan))


def create_optimizer_slots(model) -> None:
    """Create the optimizer's slots now, beside their variables, as the first step would.

    A checkpoint restored before the first step defers the slot values until the
    slots exist, keyed by the variable the checkpoint knows: for a row-split table
    that is the whole table, whose shards' slots would then start from zero.  With
    the slots made first, ``model.load_weights`` restores every shard's slot (and a
    whole table's slot from a row-split save).
    """
    optimizer = model.optimizer
    pairs = getattr(optimizer, "_optimizers_and_vars", None)  # TFRS CompositeOptimizer
    pairs = [(opt, list(fn())) for opt, fn in pairs] if pairs else [(optimizer, model.trainable_variables)]
    with model.distribute_strategy.scope():
        for opt, variables in pairs:
            opt._create_all_weights(variables)  # noqa: SLF001 (what apply_gradients does first)
