"""Training over several devices: the placement plan, hybrid parallelism, and strategies.

Modes (``--parallel``):

``none``
    one device, as without this module.
``hybrid``
    the paper's parallel DLRM.  A placement plan (:func:`plan_placement`) puts each
    embedding table on one device, balancing bytes greedily (largest table first);
    a table that fits on no single device within ``budget`` bytes is split by rows
    over the fewest devices that can hold it.  Each step, every table is looked up
    on its own device over the whole batch and the pooled vectors are split there
    by example, one slice per device (the all-to-all).  Each device then runs the
    dense part (bottom MLP, interaction, top MLP for DLRM; cross and deep networks
    for DCN) on its slice of the batch.  The loss is the single-device loss of the
    whole batch; gradients (``tf.gradients``, each placed beside its forward op)
    are summed over the slices for the dense weights and flow back to each table's
    device as ``IndexedSlices``, where the optimizer applies them as sparse row
    updates.  One step is one single-device step on the whole batch.
``mirrored``
    ``tf.distribute.MirroredStrategy``: every variable, tables included, on every
    device; the loss is scaled so that a step is the whole-batch step even when the
    batch does not split evenly over the replicas.
``ps``
    ``tf.distribute.ParameterServerStrategy`` over a cluster described by
    ``TF_CONFIG``: each table is sharded by rows over the parameter servers (a
    ``variable_partitioner`` that shards tables only), workers run the steps
    (asynchronously, as that strategy does).

Variables keep the names they have on one device (``sparse_arch/table_C1``); a
row-split table is a ``ShardedVariable`` that checkpoints as one whole table, so a
checkpoint written under any device count restores under any other, and into the
plain single-device model that :func:`tfdlrm.training.load_run` builds.

Devices are named generically (``/device:GPU:k`` on a machine with GPUs,
``/device:CPU:k`` otherwise); without GPUs, :func:`configure_devices` splits the CPU
into logical devices, which must happen before TensorFlow's runtime starts.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from tfdlrm.errors import UserError
from tfdlrm.presets import ModelConfig

PARALLEL_MODES = ("none", "hybrid", "mirrored", "ps")
BYTES_PER_VALUE = 4  # float32 tables
_DEVICE = re.compile(r"^(?:/?(?:job:[^/]+/)?(?:replica:\d+/)?(?:task:\d+/)?(?:device:)?)?(cpu|gpu):(\d+)$", re.I)


# -- device lists ---------------------------------------------------------------------
def parse_devices(text) -> "int | list[str]":
    """``--devices``: a count (``4``) or a comma-separated list (``GPU:0,GPU:1`` or
    ``/device:CPU:0,/device:CPU:2``).  Pure parsing: no TensorFlow."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"--devices must be a positive device count or a list of devices, got {text}")
        return text
    if isinstance(text, (list, tuple)):
        names = [str(t) for t in text]
    else:
        text = str(text).strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return parse_devices(int(text))
        names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError(f"--devices must be a positive device count or a list of devices, got {text!r}")
    out = []
    for name in names:
        match = _DEVICE.match(name)
        if not match:
            raise UserError(f"--devices: cannot read device {name!r}; write a count such as 4, "
                            f"or devices such as GPU:0,GPU:1 or CPU:0,CPU:1")
        out.append(f"/device:{match.group(1).upper()}:{int(match.group(2))}")
    if len(set(out)) != len(out):
        raise UserError(f"--devices lists a device twice: {', '.join(names)}")
    if len({d.split(':')[1] for d in out}) > 1:
        raise UserError(f"--devices mixes device types: {', '.join(names)}; use GPUs or CPUs")
    return out


def accelerator_type() -> str:
    """``GPU`` when the machine has GPUs, else ``CPU``: the kind of device a count means."""
    import tensorflow as tf

    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def device_names(devices) -> list[str]:
    """The device strings a ``--devices`` value means (no TensorFlow runtime start)."""
    devices = parse_devices(devices)
    if isinstance(devices, list):
        return devices
    kind = accelerator_type()
    return [f"/device:{kind}:{k}" for k in range(devices)]


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


# -- the placement plan ----------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of a table, on ``device``."""

    device: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TablePlacement:
    name: str  # feature name, C1 ...
    rows: int
    dim: int
    shards: tuple[Shard, ...]

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * BYTES_PER_VALUE

    @property
    def home(self) -> str:
        """Where the table's pooled vectors are assembled: its first shard's device."""
        return self.shards[0].device

    @property
    def split(self) -> bool:
        return len(self.shards) > 1


@dataclass
class PlacementPlan:
    devices: list[str]
    tables: list[TablePlacement]
    budget: Optional[int] = None
    dense_bytes: int = 0
    dense_device: str = ""

    def bytes_per_device(self) -> dict[str, int]:
        """Embedding bytes on each device (optimizer slots come on top, beside their table)."""
        out = {d: 0 for d in self.devices}
        for t in self.tables:
            for s in t.shards:
                out[s.device] += s.rows * t.dim * BYTES_PER_VALUE
        return out

    def tables_per_device(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {d: [] for d in self.devices}
        for t in self.tables:
            for s in t.shards:
                out[s.device].append(t.name)
        return out

    def table(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "devices": list(self.devices),
            "budget": self.budget,
            "tables": [{"table": t.name, "rows": t.rows, "bytes": t.bytes,
                        "shards": [{"device": s.device, "start": s.start, "stop": s.stop} for s in t.shards]}
                       for t in self.tables],
            "bytes_per_device": self.bytes_per_device(),
            "dense_bytes": self.dense_bytes,
            "dense_device": self.dense_device,
        }

    def format(self) -> str:
        lines = [f"{'table':8} {'rows':>12} {'bytes':>15}  device"]
        for t in self.tables:
            if not t.split:
                where = t.home
            else:
                where = ", ".join(f"{s.device} rows {s.start}-{s.stop - 1}" for s in t.shards)
            lines.append(f"{t.name:8} {t.rows:>12,} {t.bytes:>15,}  {where}")
        lines.append("")
        lines.append(f"{'device':24} {'tables':>6} {'bytes':>15}")
        per_table = self.tables_per_device()
        for device, b in self.bytes_per_device().items():
            lines.append(f"{device:24} {len(per_table[device]):>6} {b:>15,}")
        total = sum(t.bytes for t in self.tables)
        budget = f"; budget {self.budget:,} bytes per device" if self.budget else ""
        lines.append(f"embeddings: {total:,} bytes in {len(self.tables)} tables on {len(self.devices)} "
                     f"device(s){budget}")
        if self.dense_bytes:
            lines.append(f"dense layers: {self.dense_bytes:,} bytes, kept on {self.dense_device} and run by "
                         f"every device on its slice of the batch")
        lines.append("optimizer slots (Adagrad: one per table value; Adam: two) live beside their table.")
        return "\n".join(lines)


def _div_rows(rows: int, parts: int) -> list[int]:
    """Row counts of ``parts`` contiguous shards, the first ``rows % parts`` one larger
    (TensorFlow's "div" partitioning, as ParameterServerStrategy shards)."""
    base, extra = divmod(rows, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_placement(table_rows: Sequence[int], dim: int, devices: Sequence[str], budget: Optional[int] = None,
                   feature_names: Optional[Sequence[str]] = None, dense_bytes: int = 0) -> PlacementPlan:
    """Assign every table to a device, balancing bytes greedily, largest table first.

    Each table goes whole to the device with the fewest bytes so far (ties: the first
    device).  A table that does not fit there within ``budget`` bytes (larger than
    the budget, or than what is left of it) is split by rows into equal parts over
    the fewest devices that can hold them, the largest part on the emptiest device.
    A table that cannot be placed at all is a :class:`UserError`.
    """
    from tfdlrm.layers.embedding import default_feature_names

    devices = list(devices)
    if not devices:
        raise UserError("a placement plan needs at least one device")
    if budget is not None and budget <= 0:
        raise UserError(f"--budget must be a positive number of bytes, got {budget}")
    names = list(feature_names) if feature_names is not None else default_feature_names(len(table_rows))
    row_bytes = dim * BYTES_PER_VALUE
    load = [0] * len(devices)
    shards: dict[int, tuple[Shard, ...]] = {}

    def fits(d: int, rows: int) -> bool:
        return budget is None or load[d] + rows * row_bytes <= budget

    order = sorted(range(len(table_rows)), key=lambda t: (-table_rows[t], t))
    for t in order:
        rows = int(table_rows[t])
        by_load = sorted(range(len(devices)), key=lambda d: (load[d], d))
        if fits(by_load[0], rows):
            shards[t] = (Shard(devices[by_load[0]], 0, rows),)
            load[by_load[0]] += rows * row_bytes
            continue
        for parts in range(2, min(len(devices), rows) + 1):
            sizes = _div_rows(rows, parts)
            chosen = by_load[:parts]
            if all(fits(d, n) for d, n in zip(chosen, sizes)):
                start, placed = 0, []
                for d, n in zip(chosen, sizes):
                    placed.append(Shard(devices[d], start, start + n))
                    load[d] += n * row_bytes
                    start += n
                shards[t] = tuple(placed)
                break
        else:
            free = sum(max(budget - x, 0) for x in load) if budget is not None else 0
            raise UserError(
                f"cannot place table {names[t]} ({rows:,} rows, {rows * row_bytes:,} bytes) on "
                f"{len(devices)} device(s) with a budget of {budget:,} bytes each ({free:,} bytes left; "
                f"{sum(table_rows) * row_bytes:,} needed in all, {budget * len(devices):,} available); "
                f"raise --budget or use more --devices")
    tables = [TablePlacement(names[t], int(table_rows[t]), int(dim), shards[t]) for t in range(len(table_rows))]
    return PlacementPlan(devices, tables, budget, int(dense_bytes), devices[0])


def plan_for(config: ModelConfig, devices, budget: Optional[int] = None, model: str = "dlrm") -> PlacementPlan:
    """The placement plan of a model config over ``devices`` (a count or a list)."""
    names = devices if isinstance(devices, list) and all(str(d).startswith("/device:") for d in devices) \
        else device_names(devices)
    return plan_placement(config.table_rows, config.embedding_dim, names, budget,
                          dense_bytes=dense_parameter_count(config, model) * BYTES_PER_VALUE)


def dense_parameter_count(config: ModelConfig, model: str = "dlrm") -> int:
    """Parameters outside the embedding tables."""
    tables = sum(config.table_rows) * config.embedding_dim
    if model == "dlrm":
        from tfdlrm.models import DLRM

        return DLRM.parameter_count(config) - tables
    from baselines.dcn import DCN

    return DCN.parameter_count(config, "v1" if model == "dcn" else "v2") - tables


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_bytes(text) -> int:
    """``--budget``: bytes, or with a unit: ``512MiB``, ``2GiB`` (1024-based), ``500MB`` (1000-based)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UserError(f"--budget: expected bytes such as 1000000, 512MiB or 2GB, got {text!r}")
        number, unit = float(match.group(1)), (match.group(2) or "").lower()
        scale = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2,
                 "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
                 "tb": 1000 ** 4, "tib": 1024 ** 4}.get(unit)
        if scale is None:
            raise UserError(f"--budget: unknown unit in {text!r}; use B, KiB, MiB, GiB (or KB, MB, GB)")
        value = int(number * scale)
    if value <= 0:
        raise UserError(f"--budget must be a positive number of bytes, got {text!r}")
    return value


# -- hybrid: variables placed by the plan, a step over slices of the batch ---------------------------------------
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

        from tfdlrm.layers.embedding import table_variable_name

        tables = {table_variable_name(t.name): t for t in self.plan.tables}
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

        from tfdlrm.models import check_features

        dense, sparse = check_features(x, model.config, type(model).__name__)
        devices = self.plan.devices
        parts = len(devices)
        sizes = _split_sizes(tf.shape(dense, out_type=tf.int32)[0], parts)
        homes = [t.home for t in self.plan.tables]
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


# -- mirrored: every variable replicated, the whole-batch loss -----------------------------------------------------
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


# -- parameter servers ---------------------------------------------------------------------------------------------
_TABLE_CREATION = threading.local()  # .active: the variable being created is a table


class TablePartitioner:
    """A ``variable_partitioner`` that shards embedding tables by rows into ``shards``
    parts and leaves every other variable whole.

    ParameterServerStrategy passes a partitioner only shapes; :func:`ps_table_scope`
    marks which variables are tables while the model is built.
    """

    def __init__(self, shards: int):
        if shards < 1:
            raise UserError(f"tables need at least one shard, got {shards}")
        self.shards = int(shards)

    def __call__(self, shape, dtype, axis=0):
        partitions = [1] * len(shape)
        if getattr(_TABLE_CREATION, "active", False):
            partitions[axis] = min(self.shards, int(shape[axis]))
        return partitions


@contextlib.contextmanager
def ps_table_scope():
    """Inside a ParameterServerStrategy scope: build the model here so its tables (and
    only they) go through :class:`TablePartitioner`."""
    import tensorflow as tf

    from tfdlrm.layers.embedding import table_variable_name

    prefix = table_variable_name("")

    def creator(next_creator, **kwargs):
        _TABLE_CREATION.active = (kwargs.get("name") or "").startswith(prefix)
        try:
            return next_creator(**kwargs)
        finally:
            _TABLE_CREATION.active = False

    with tf.variable_creator_scope(creator):
        yield


def check_tf_config() -> dict:
    """``TF_CONFIG`` parsed and checked (a cluster of ``host:port`` lists, and a task in it)."""
    import json

    try:
        config = json.loads(os.environ["TF_CONFIG"])
    except ValueError as e:
        raise UserError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and all(isinstance(a, str) and ":" in a for a in v) for v in cluster.values()):
        raise UserError('TF_CONFIG needs a "cluster": {"job": ["host:port", ...], ...}')
    task = config.get("task")
    if isinstance(task, dict) and "type" in task:
        kind, index = task.get("type"), task.get("index", 0)
        if kind not in cluster and kind != "chief":
            raise UserError(f"TF_CONFIG's task type {kind!r} is not a job of its cluster ({', '.join(cluster)})")
        if kind in cluster and not (isinstance(index, int) and 0 <= index < len(cluster[kind])):
            raise UserError(f"TF_CONFIG's task index {index!r} is outside its {kind!r} job "
                            f"({len(cluster[kind])} task(s))")
    return config


def cluster_from_tf_config(cluster_resolver=None):
    """The cluster resolver for ``--parallel ps``: ``TF_CONFIG``'s, unless one is given."""
    import tensorflow as tf

    if cluster_resolver is None:
        if not os.environ.get("TF_CONFIG"):
            raise UserError("--parallel ps needs TF_CONFIG describing the cluster (see README, Parallelism)")
        check_tf_config()
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = cluster_resolver.cluster_spec().as_dict()
    if not jobs.get("ps") or not jobs.get("worker"):
        raise UserError(f"--parallel ps needs 'ps' and 'worker' jobs in TF_CONFIG's cluster, got {sorted(jobs)}")
    return cluster_resolver


def ps_strategy(cluster_resolver=None, table_shards: Optional[int] = None):
    """A ``ParameterServerStrategy`` for the cluster in ``TF_CONFIG`` (or ``cluster_resolver``),
    with tables sharded over all parameter servers (or into ``table_shards`` parts)."""
    import tensorflow as tf

    cluster_resolver = cluster_from_tf_config(cluster_resolver)
    num_ps = len(cluster_resolver.cluster_spec().as_dict()["ps"])
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    return tf.distribute.ParameterServerStrategy(
        cluster_resolver, variable_partitioner=TablePartitioner(table_shards or num_ps))


def run_server(cluster_resolver=None) -> None:
    """Run this host's worker or parameter server (from ``TF_CONFIG``) until killed."""
    import tensorflow as tf

    if cluster_resolver is None:
        if not os.environ.get("TF_CONFIG"):
            raise UserError("tfdlrm server needs TF_CONFIG naming the cluster and this task (see README)")
        check_tf_config()
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    task_type, task_id = cluster_resolver.task_type, cluster_resolver.task_id
    if task_type not in ("worker", "ps"):
        raise UserError(f"tfdlrm server runs a 'worker' or 'ps' task; TF_CONFIG's task is {task_type!r} "
                        f"(the chief runs tfdlrm train --parallel ps)")
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    try:
        server = tf.distribute.Server(cluster_resolver.cluster_spec(), job_name=task_type, task_index=task_id,
                                      protocol=cluster_resolver.rpc_layer or "grpc", start=True)
    except tf.errors.OpError as e:  # a bad address, a port in use
        from tfdlrm.errors import io_error_text

        raise UserError(f"cannot start the {task_type} {task_id} server: {io_error_text(e)}") from None
    print(f"tfdlrm: {task_type} {task_id} serving at {server.target}", flush=True)
    server.join()


def parse_budget(budget) -> Optional[int]:
    return None if budget is None else parse_bytes(budget)


def check_parallel_args(mode, devices, budget, steps_per_epoch=None) -> None:
    """The checks of ``--parallel``, ``--devices`` and ``--budget`` that need no TensorFlow."""
    if mode is not None and mode not in PARALLEL_MODES:
        raise UserError(f"unknown parallel mode {mode!r}; choose one of: {', '.join(PARALLEL_MODES)}")
    if devices is not None:
        if mode == "ps":
            raise UserError("--parallel ps takes its devices from TF_CONFIG's cluster; drop --devices")
        parsed = parse_devices(devices)
        count = parsed if isinstance(parsed, int) else len(parsed)
        if mode == "none" and count > 1:
            raise UserError(f"--parallel none trains on one device but --devices names {count}; "
                            f"use --parallel hybrid or mirrored")
    if budget is not None:
        parse_bytes(budget)
        if mode not in (None, "hybrid"):
            raise UserError(f"--budget applies to --parallel hybrid (its placement plan), not {mode}")
    if mode == "ps" and steps_per_epoch is None:
        raise UserError("--parallel ps needs --steps-per-epoch (workers read their data shards endlessly)")
    if mode == "ps" and not os.environ.get("TF_CONFIG"):
        raise UserError("--parallel ps needs TF_CONFIG describing the cluster (see README, Parallelism)")


# -- one setup for training ----------------------------------------------------------------------------------------
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


# -- bench parallel ---------------------------------------------------------------------------------------------------
@dataclass
class BenchRow:
    devices: int
    mode: str
    step_ms: float
    examples_per_second: float
    bytes_per_device: dict


def bench_parallel(preset: str = "kaggle", rows: Optional[int] = 100_000, device_counts: Iterable[int] = (1, 2, 4),
                   batch_size: int = 2048, steps: int = 20, warmup: int = 3, mode: str = "hybrid",
                   model_name: str = "dlrm", optimizer: str = "sgd", budget: Optional[int] = None,
                   overrides: Optional[dict] = None, log=print) -> list[BenchRow]:
    """Step time and embedding bytes per device of ``mode`` over each device count.

    Every count is a prefix of the same logical devices in this process.  On a CPU
    they share its cores: the figures say what the placement costs, not a speed-up.
    """
    import tensorflow as tf

    from pipelines.sources import open_data
    from tfdlrm.presets import get_preset
    from tfdlrm.training import build_model, compile_model

    counts = sorted(set(int(c) for c in device_counts))
    if not counts or counts[0] <= 0:
        raise UserError(f"device counts must be positive, got {list(device_counts)}")
    if mode not in ("hybrid", "mirrored"):
        raise UserError(f"bench parallel compares hybrid or mirrored, got {mode!r}")
    all_devices = configure_devices(max(counts))
    config = get_preset(preset, rows=rows, **(overrides or {}))
    source = open_data("random", config, train_examples=batch_size * (steps + warmup), eval_examples=batch_size)
    data = source.train_dataset(batch_size, seed=1).take(steps + warmup).cache()
    for _ in data:  # generate once, outside the timing
        pass
    out = []
    for count in counts:
        names = all_devices[:count]
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(1)
        setup = make_parallel(mode, names, config, budget, model_name)
        with setup.scope():
            model = build_model(model_name, config)
            compile_model(model, optimizer, 0.01, metrics=False)
        setup.attach(model)
        clock = _step_clock(warmup)
        model.fit(data, epochs=1, verbose=0, callbacks=[clock])
        step = clock.seconds / max(clock.steps, 1)
        if setup.plan is not None:
            per_device = setup.plan.bytes_per_device()
        else:
            replicated = sum(config.table_rows) * config.embedding_dim * BYTES_PER_VALUE
            per_device = {d: replicated for d in names}
        row = BenchRow(count, mode, step * 1000, batch_size / step, per_device)
        log(f"{count} device(s): {row.step_ms:.1f} ms/step, {row.examples_per_second:,.0f} examples/s")
        out.append(row)
    return out


def _step_clock(warmup: int):
    """A callback timing the steps after ``warmup``: ``.seconds`` over ``.steps``."""
    import tensorflow as tf

    class StepClock(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.seconds, self._start = 0, 0.0, None

        def on_train_batch_begin(self, batch, logs=None):
            if batch == warmup:
                self.model.optimizer.iterations.numpy()  # wait for the warm-up steps
                self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch >= warmup:
                self.steps += 1

        def on_train_end(self, logs=None):
            self.model.optimizer.iterations.numpy()  # wait for the last step
            if self._start is not None:
                self.seconds = time.perf_counter() - self._start

    return StepClock()


def format_bench(rows: Sequence[BenchRow]) -> str:
    lines = [f"{'devices':>7} {'mode':8} {'ms/step':>9} {'examples/s':>11}  embedding bytes per device"]
    for r in rows:
        per = ", ".join(f"{d.rsplit('/', 1)[-1].replace('device:', '')} {b / 2**20:,.1f} MiB"
                        for d, b in r.bytes_per_device.items())
        lines.append(f"{r.devices:>7} {r.mode:8} {r.step_ms:>9.1f} {r.examples_per_second:>11,.0f}  {per}")
    lines.append("logical CPU devices share the same cores: this reports what placement costs, not a speed-up.")
    return "\n".join(lines)


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


def batch_predictor(model):
    """``features -> probabilities (numpy)`` for one batch, on this process.

    Under ParameterServerStrategy, ``predict_on_batch`` would dispatch to workers; the
    coordinator instead calls the model itself, reading the variables from the
    parameter servers.
    """
    import numpy as np
    import tensorflow as tf

    if isinstance(model.distribute_strategy, tf.distribute.experimental.ParameterServerStrategy):
        call = tf.function(lambda features: model(features, training=False))
        return lambda features: np.asarray(call(features))
    return lambda features: np.asarray(model.predict_on_batch(features))
