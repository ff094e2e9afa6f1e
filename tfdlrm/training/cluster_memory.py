"""Memory per process of a ``--parallel ps`` run, estimated and checked by the chief before any variable.

No process holds a whole table: each parameter server creates, updates and checkpoints its own row
shard of every table (``TablePartitioner``: one shard a server, equal "div" row ranges), the workers
and the chief hold none. So the estimate is per process, not per run:

* a parameter server: TensorFlow, the largest server's shards of the tables and their slots, and (at
  worst, round robin) every dense weight;
* a worker: TensorFlow, the traced step and a training batch's activations;
* the chief: TensorFlow, the coordinator's traced functions, an evaluation batch and the held-out
  predictions it evaluates.

Calibrated with ``tfdlrm cluster`` (docs/parallelism.md, **Memory per process**): the largest data
segment (``VmData``, what ``RLIMIT_DATA`` caps) and peak RSS of each process, kaggle widths.
The cap each process is checked against: ``--memory-limit`` (every process), else the launcher's
``--memory-per-process`` (every process it starts), else the chief's own caps (the chief only).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

from tfdlrm.errors import UserError
from tfdlrm.parallel.devices import MEMORY_ENV, tf_config_part
from tfdlrm.presets import ModelConfig
from tfdlrm.sizes import parameter_count
from tfdlrm.tables import table_specs
from tfdlrm.training.memory import (
    EVAL_ROW_BYTES,
    FLOAT,
    SLOTS,
    TRAIN_ACTIVATION_FACTOR,
    activation_width,
    format_bytes,
    memory_caps,
    parse_memory_limit,
)

GIB = 1 << 30
# Measured (tfdlrm cluster, 2 MiB thread stacks): a server's data segment 0.40-0.45 GiB before its shards,
# RSS 0.61 GiB; its shards cost 1.0-1.05x their bytes (26 x 3.7M rows over 3 servers: 2.58 GiB data,
# 2.68 GiB peak RSS for 1.91 GiB of shards).
SERVER_BYTES = int(0.65 * GIB)
SHARD_FACTOR = 1.05
# The chief: data segment 1.99-2.13 GiB (peak RSS 1.2-1.65 GiB), tiny to kaggle widths.
CHIEF_BYTES = int(2.1 * GIB)
# A worker: data segment 0.51-0.84 GiB, peak RSS 0.61-0.88 GiB.
WORKER_BYTES = int(0.9 * GIB)


@dataclass(frozen=True)
class ClusterEstimate:
    servers: int
    workers: int
    server: int  # the largest server's estimate
    shards: int  # its shards of the tables and their slots
    worker: int
    chief: int

    def describe(self) -> str:
        return (f"chief {format_bytes(self.chief)}, each of {self.servers} ps up to {format_bytes(self.server)} "
                f"(its table shards and their slots {format_bytes(self.shards)}), each of {self.workers} "
                f"worker(s) {format_bytes(self.worker)}")


def cluster_size() -> tuple:
    """``(parameter servers, workers)`` of TF_CONFIG's cluster."""
    cluster = tf_config_part("cluster")
    return len(cluster.get("ps") or []), len(cluster.get("worker") or [])


def estimate_cluster_memory(model: str, config: ModelConfig, optimizer: str, embedding_optimizer: Optional[str],
                            batch_size: int, eval_batch_size: int, eval_rows: int, servers: int,
                            workers: int) -> ClusterEstimate:
    if servers < 1:
        raise UserError("--parallel ps needs at least one parameter server in TF_CONFIG's cluster")
    row_parts = [part for spec in table_specs(config) for part in spec.parts if part.rowwise]
    table_slots = SLOTS[embedding_optimizer or optimizer]
    # the largest shard of each part (the first: "div" gives the first shards the extra rows) on one server
    shard = sum(math.ceil(p.rows / min(servers, p.rows)) * p.width * FLOAT for p in row_parts)
    shards = int(shard * (1 + table_slots) * SHARD_FACTOR)
    dense = (parameter_count(model, config) * FLOAT - sum(p.bytes for p in row_parts)) * (1 + SLOTS[optimizer])
    width = activation_width(model, config) * FLOAT
    return ClusterEstimate(
        servers=servers, workers=workers, server=SERVER_BYTES + shards + dense, shards=shards,
        worker=WORKER_BYTES + TRAIN_ACTIVATION_FACTOR * batch_size * width,
        chief=CHIEF_BYTES + eval_batch_size * width + eval_rows * EVAL_ROW_BYTES)


def check_cluster_memory(spec, config: ModelConfig, eval_rows: int,
                         log: Optional[Callable[[str], None]] = None) -> Optional[ClusterEstimate]:
    """For ``--parallel ps``: estimate each process's memory, print it, and refuse (one line) a process
    its cap cannot hold. None for other modes, or where TF_CONFIG names no parameter server."""
    servers, workers = cluster_size()
    if spec.parallel != "ps" or not servers:  # no cluster described: train refuses that itself
        return None
    limit = parse_memory_limit(getattr(spec, "memory_limit", None))
    estimate = estimate_cluster_memory(spec.model, config, spec.optimizer, spec.embedding_optimizer,
                                       spec.batch_size, spec.eval_batch_size, eval_rows, servers, workers)
    launcher = os.environ.get(MEMORY_ENV)
    if limit is not None:
        everyone = [(limit, "--memory-limit")]
    elif launcher and launcher.isdigit():
        everyone = [(int(launcher), "tfdlrm cluster --memory-per-process")]
    else:
        everyone = []
    own = everyone or [(cap, f"the chief's {name}") for cap, name in memory_caps()]
    if log is not None:
        caps = ", ".join(f"{format_bytes(c)} ({n})" for c, n in (everyone or own))
        log(f"memory per process (estimated): {estimate.describe()}" + (f"; cap {caps}" if caps else ""))
    checks = [("each parameter server", estimate.server, everyone), ("each worker", estimate.worker, everyone),
              ("the chief", estimate.chief, own)]
    for who, need, caps in checks:
        for cap, name in caps:
            if need > cap:
                fix = ("more parameter servers, smaller tables (--rows, --hash-buckets, --qr-collisions) or "
                       "sgd (no slots)") if who == "each parameter server" else "a smaller --batch-size"
                shards = (f" (its table shards and their slots {format_bytes(estimate.shards)})"
                          if who == "each parameter server" else "")
                raise UserError(f"--parallel ps: {who} needs an estimated {format_bytes(need)}{shards}, more than "
                                f"{format_bytes(cap)} ({name}); use {fix}, or a larger cap")
    return estimate
