"""How much memory training will take, checked before any variable is created (``--memory-limit``).

``estimate_training_memory`` is closed-form arithmetic on the model config (``tfdlrm/sizes.py``;
each table's parts from ``tfdlrm/tables.py``, so QR and MD tables count what they create),
calibrated against measured peak RSS (docs/training.md, **Memory**): the embedding tables as
they are created, the optimizer's slots (sgd none, adagrad one per variable, adam two), what
the step adds (adam's dense slot updates, mirrored's replicas and densified gradients), the
activations of a batch, held-out predictions, and TensorFlow itself.  ``check_training_memory``
refuses a run whose estimate exceeds ``--memory-limit``, or else what the machine has
available (``MemAvailable`` in ``/proc/meminfo`` plus what this process already holds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tfdlrm.errors import UserError
from tfdlrm.presets import ModelConfig
from tfdlrm.sizes import interaction_output_width, parameter_count
from tfdlrm.tables import table_specs

FLOAT = 4  # bytes: every variable is float32 (bf16 is a compute dtype only)
# Measured (docs/training.md): a table costs 1.125x its bytes in RSS as it is created
# (kaggle preset, 250k to 2M rows per table), each slot 1x.
TABLE_BUILD_FACTOR = 1.125
SLOTS = {"sgd": 0, "adagrad": 1, "adam": 2}
# Legacy Adam rewrites its dense slots every step (``m * beta_1``, ``v * beta_2``, then the
# whole table's update): up to two table-sized temporaries per table (1.8x measured).
ADAM_STEP_TEMPORARIES = 2
# TensorFlow imported and started, when the process's own RSS is not known (measured 0.61 GiB).
RUNTIME_BYTES = 700 << 20
# The step's fixed cost: traced and compiled functions, metrics, the input pipeline's buffers
# (measured 0.1 GiB for Keras's step, 0.2 sgd and 0.35-0.4 GiB adagrad for the fast step).
STEP_BYTES = 400 << 20
# A training batch holds its activations, their gradients and the backward pass's temporaries:
# 1.3x (sgd) to 1.9x (adagrad) the forward activations were measured; an evaluation batch 1x.
TRAIN_ACTIVATION_FACTOR = 3
# Exact evaluation keeps every held-out label and probability (float32) and sorts float64 copies.
EVAL_ROW_BYTES = 80

last_estimate: Optional["MemoryEstimate"] = None  # the latest check's, for the CLI's out-of-memory line


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a training process, by part."""

    tables: int  # embedding tables, every copy, as created
    slots: int  # the optimizer's slots of the tables
    dense: int  # the other weights and their slots
    step: int  # what a step adds: adam's slot temporaries, mirrored's replicas and gradients
    activations: int  # a training or evaluation batch; the held-out predictions
    runtime: int  # TensorFlow and the process (its RSS when checked), and the step's fixed cost

    @property
    def total(self) -> int:
        return self.tables + self.slots + self.dense + self.step + self.activations + self.runtime

    def describe(self) -> str:
        """``3.0 GiB (embedding tables 1.9 GiB, activations 75.0 MiB, ...)``: the total and its non-zero parts."""
        parts = [("embedding tables", self.tables), ("optimizer slots", self.slots), ("dense weights", self.dense),
                 ("step temporaries", self.step), ("activations", self.activations),
                 ("TensorFlow and the step's fixed cost", self.runtime)]
        shown = ", ".join(f"{name} {format_bytes(n)}" for name, n in parts if n or name == "embedding tables")
        return f"{format_bytes(self.total)} ({shown})"


def format_bytes(n: float) -> str:
    """``512 B``, ``3.2 MiB``, ``1.7 GiB``, ``3.6 TiB`` (1024-based, as ``--memory-limit 8G``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def activation_width(model: str, config: ModelConfig) -> int:
    """Floats one example passes through the model's layers (inputs, every layer's output,
    the looked-up rows of a bag before pooling, the dot interaction's Gram matrix)."""
    pooled = config.num_tables * config.vector_dim
    gathered = pooled * config.ids_per_lookup if config.ids_per_lookup > 1 else 0
    width = config.num_dense + pooled + gathered
    if model == "dlrm":
        width += sum(config.bottom_mlp[1:]) + sum(config.top_mlp)
        width += interaction_output_width(config.interaction, config.bottom_mlp[-1], config.vector_dim,
                                          config.num_tables, config.self_interaction)
        if config.interaction == "dot":
            width += (config.num_tables + 1) ** 2
    else:
        x0 = config.num_dense + pooled
        rank = config.cross_low_rank or x0
        width += x0 + config.cross_layers * (2 * x0 + (rank if model == "dcn-v2" else 1))
        width += sum(config.deep_mlp) + 1
    return width


def estimate_training_memory(model: str, config: ModelConfig, optimizer: str = "sgd",
                             embedding_optimizer: Optional[str] = None, batch_size: int = 128,
                             eval_batch_size: int = 4096, eval_rows: int = 0, parallel: Optional[str] = None,
                             devices: int = 1, baseline: Optional[int] = None) -> MemoryEstimate:
    """The estimated peak RSS of training ``model`` on ``config`` (see the module docstring).

    ``parallel``: None/``none`` or ``hybrid`` (one copy of every table; a table split by rows is
    first created whole: counted as the largest table once more) or ``mirrored`` (``devices``
    replicas of every variable and slot, and each replica's table gradients densified, plus
    their sum).  ``baseline``: the process's RSS now (default: TensorFlow's, ``RUNTIME_BYTES``).
    """
    for name in (optimizer, embedding_optimizer):
        if name is not None and name not in SLOTS:
            raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(SLOTS)}")
    row_parts = [part for spec in table_specs(config) for part in spec.parts if part.rowwise]
    table_bytes = sum(part.bytes for part in row_parts)  # MD projections are dense weights
    dense_bytes = (parameter_count(model, config) * FLOAT) - table_bytes
    table_slots = SLOTS[embedding_optimizer or optimizer]
    dense_slots = SLOTS[optimizer]
    copies = devices if parallel == "mirrored" else 1
    tables = int(table_bytes * (TABLE_BUILD_FACTOR + copies - 1))
    step = 0
    if parallel == "hybrid":
        step += max(part.bytes for part in row_parts)
    if parallel == "mirrored":
        step += (copies + 1) * table_bytes  # each replica's densified table gradients, and their sum
    if table_slots == 2:
        step += ADAM_STEP_TEMPORARIES * table_bytes * copies
    width = activation_width(model, config)
    activations = max(TRAIN_ACTIVATION_FACTOR * batch_size, eval_batch_size) * width * FLOAT
    return MemoryEstimate(
        tables=tables,
        slots=table_slots * table_bytes * copies,
        dense=dense_bytes * (1 + dense_slots) * copies,
        step=int(step),
        activations=int(activations + eval_rows * EVAL_ROW_BYTES),
        runtime=(RUNTIME_BYTES if baseline is None else int(baseline)) + STEP_BYTES,
    )


# -- the machine ------------------------------------------------------------------------------------------
def proc_bytes(path: str, field: str) -> Optional[int]:
    """A ``kB`` field of a ``/proc`` file (``field: N kB``) in bytes, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (memory that can be had without swapping),
    or None where there is no such file."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def process_rss() -> Optional[int]:
    """This process's resident set (``VmRSS`` of ``/proc/self/status``) in bytes, or None."""
    return proc_bytes("/proc/self/status", "VmRSS")


# A capped process's threads: TensorFlow starts ~100 (its pools, gRPC), each with a stack of RLIMIT_STACK
# (glibc's default), and RLIMIT_DATA counts the stacks (measured: VmData 1.06 GiB with 8 MiB stacks,
# 0.40 GiB with 2 MiB, RSS 0.61 GiB both).
THREADS = 100


def cgroup_memory_limit() -> Optional[int]:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) in
    bytes, or None (no limit, or none found). It caps the cgroup's processes together."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in entries:
        if controllers == "":  # v2
            candidates = [f"/sys/fs/cgroup{path}/memory.max", "/sys/fs/cgroup/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                with open(candidate) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # v1 writes "no limit" as a huge number
                return int(text)
            break
    return None


def memory_caps() -> list:
    """This process's own caps on its memory, as ``(bytes, name)``: ``RLIMIT_DATA`` (``ulimit -d``,
    ``tfdlrm cluster --memory-per-process``) and its cgroup's limit."""
    import resource

    caps = []
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY:
        caps.append((int(soft), "RLIMIT_DATA (ulimit -d)"))
    group = cgroup_memory_limit()
    if group is not None:
        caps.append((group, "its cgroup's memory limit"))
    return caps


def thread_stacks() -> int:
    """What TensorFlow's threads' stacks add to a process's data segment (RLIMIT_DATA counts them)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    return THREADS * (8 << 20 if soft == resource.RLIM_INFINITY else min(int(soft), 8 << 20))


def parse_memory_limit(value) -> Optional[int]:
    """``--memory-limit``: None, bytes, or a size such as ``8G``, ``8GiB``, ``512MB``."""
    if value is None:
        return None
    from tfdlrm.parallel.devices import parse_bytes

    if isinstance(value, bool):
        raise UserError(f"--memory-limit: expected a size such as 8G, 512MiB or 16GB, got {value!r}")
    try:
        return parse_bytes(value)
    except UserError as e:
        raise UserError(str(e).replace("--budget", "--memory-limit")) from None


# -- the check ----------------------------------------------------------------------------------------------
def advice(optimizers=()) -> str:
    """What to make smaller, as flags."""
    text = "use smaller tables (--rows; --hash-buckets or a larger --min-frequency for raw Criteo data)"
    if any(SLOTS.get(o) for o in optimizers if o):
        text += ", sgd (no optimizer slots)"
    return text + " or a smaller --batch-size"


def _placement(spec) -> tuple:
    """``(parallel mode, device count)`` of a spec, the mode as ``make_parallel`` chooses it."""
    count = 1
    if spec.devices is not None:
        from tfdlrm.parallel.devices import parse_devices

        parsed = parse_devices(spec.devices)
        count = parsed if isinstance(parsed, int) else len(parsed)
    return spec.parallel or ("hybrid" if count > 1 else "none"), count


def _estimate(spec, config: ModelConfig, eval_rows: int, baseline: Optional[int] = None) -> MemoryEstimate:
    return estimate_training_memory(spec.model, config, spec.optimizer, spec.embedding_optimizer, spec.batch_size,
                                    spec.eval_batch_size, eval_rows, *_placement(spec), baseline=baseline)


def check_training_memory(spec, config: ModelConfig, eval_rows: int = 0,
                          available: Optional[int] = None) -> Optional[MemoryEstimate]:
    """Refuse (``UserError``, one line with the estimate and the limit) a run whose estimated
    peak exceeds ``spec.memory_limit`` or, without one, this process's own caps (``RLIMIT_DATA``
    with the threads' stacks, its cgroup's limit) or this machine's available memory plus what
    this process holds already.  Call it before building the model.  Returns the estimate, or
    None where nothing is checked: ``--parallel ps`` (each process's estimate is
    tfdlrm/training/cluster_memory.py's) and machines with GPUs (they hold the variables) unless a
    ``--memory-limit`` is given.
    ``available`` overrides ``MemAvailable`` (tests)."""
    global last_estimate
    limit = parse_memory_limit(getattr(spec, "memory_limit", None))
    if spec.parallel == "ps":  # each process's own estimate: tfdlrm/training/cluster_memory.py
        return None
    rss = process_rss()
    estimate = _estimate(spec, config, eval_rows, baseline=rss)
    last_estimate = estimate
    what = f"training {spec.model} ({spec.optimizer}) needs an estimated {estimate.describe()} of memory"
    fix = advice([spec.optimizer, spec.embedding_optimizer])
    if limit is not None:
        if estimate.total > limit:
            raise UserError(f"{what}, more than --memory-limit {format_bytes(limit)}; {fix}")
        return estimate
    refuse_over_caps(estimate.total, what, fix)
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return None
    refuse_over_machine(estimate.total, what, f"{fix}, or give --memory-limit SIZE to override the check",
                        available, rss or 0)
    return estimate


def refuse_over_caps(need: int, what: str, fix: str) -> None:
    """Refuse in one line (``UserError``: ``WHAT, more than ...; FIX``) ``need`` bytes that one of this
    process's own caps cannot hold (:func:`memory_caps`; against ``RLIMIT_DATA`` the threads' stacks
    count too, as that limit counts them)."""
    for cap, name in memory_caps():
        stacks = thread_stacks() if name.startswith("RLIMIT_DATA") else 0
        if need + stacks > cap:
            extra = f" and {format_bytes(stacks)} of thread stacks" if stacks else ""
            raise UserError(f"{what}{extra}, more than this process's {name} of {format_bytes(cap)}; {fix}")


def refuse_over_machine(need: int, what: str, fix: str, available: Optional[int] = None,
                        held: Optional[int] = None) -> None:
    """Refuse in one line ``need`` bytes more than this machine has for this process: ``MemAvailable``
    (or ``available``) plus what the process holds (its RSS, or ``held``). Nothing where there is no
    ``/proc/meminfo``."""
    free = available_memory() if available is None else available
    if free is None:
        return
    held = (process_rss() or 0) if held is None else held
    if need > free + held:
        raise UserError(f"{what}, more than the {format_bytes(free + held)} this machine has for it (MemAvailable "
                        f"{format_bytes(free)} + this process's {format_bytes(held)}); {fix}")


def check_comparison_memory(specs) -> Optional[MemoryEstimate]:
    """``compare``: the largest run's estimate checked before the first run trains, so that a
    comparison is refused at once rather than after the runs that fit.  The runs share data,
    preset and batch size (``check_comparable``); the data is opened as ``train`` opens it."""
    specs = [s for s in specs if s.parallel != "ps"]
    if not specs:
        return None
    from tfdlrm.parallel.setup import configure_devices
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.presets import get_preset

    spec = specs[0]
    if spec.devices is not None:
        configure_devices(spec.devices)  # before TensorFlow's runtime starts, as train() does
    config = get_preset(spec.preset, rows=spec.rows, **spec.overrides)  # training.spec's model_config_for
    source = open_data(spec.data, config, train_examples=spec.train_examples,
                       eval_examples=spec.eval_examples, data_seed=spec.data_seed, eval_data=spec.eval_data,
                       cache_dir=spec.cache_dir, hash_buckets=spec.hash_buckets, min_frequency=spec.min_frequency,
                       val_data=spec.val_data, val_fraction=spec.val_fraction)
    rows = held_out_rows(source)
    largest = max(specs, key=lambda s: _estimate(s, source.config, rows).total)
    return check_training_memory(largest, source.config, rows)


def held_out_rows(source) -> int:
    """The rows of the larger held-out split (validation or test) of a data source."""
    return max(int(getattr(source, "eval_examples", 0) or 0), int(getattr(source, "val_examples", 0) or 0))
