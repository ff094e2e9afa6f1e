"""``--parallel ps``: ParameterServerStrategy from TF_CONFIG, tables sharded by rows over the servers."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

from tfdlrm.errors import UserError
from tfdlrm.parallel.devices import NETWORK_ENV, check_tf_config, tf_config_part

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

    from tfdlrm.presets import table_variable_name

    prefix = table_variable_name("")

    def creator(next_creator, **kwargs):
        _TABLE_CREATION.active = (kwargs.get("name") or "").startswith(prefix)
        try:
            return next_creator(**kwargs)
        finally:
            _TABLE_CREATION.active = False

    with tf.variable_creator_scope(creator):
        yield


def cluster_from_tf_config(cluster_resolver=None):
    """The cluster resolver for ``--parallel ps``: ``TF_CONFIG``'s, unless one is given."""
    import tensorflow as tf

    if cluster_resolver is None:
        if not os.environ.get("TF_CONFIG"):
            raise UserError("--parallel ps needs TF_CONFIG describing the cluster (see docs/parallelism.md)")
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


def prepare_server_environment() -> None:
    """Before TensorFlow loads in ``tfdlrm server``: a parameter server (TF_CONFIG's task ``ps``) runs
    without oneDNN's CPU allocator (``TF_ENABLE_ONEDNN_OPTS=0`` unless set). That allocator's pool
    reserves up to twice the memory in use (measured: 4.1 GiB of data segment for a 1.9 GiB table
    shard against 1.9 GiB without it), which a memory cap (RLIMIT_DATA) counts; a server holds and
    updates rows and runs no matmul, where oneDNN helps."""
    if tf_config_part("task").get("type") == "ps":  # a TF_CONFIG that cannot be read: run_server says why
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def run_server(cluster_resolver=None) -> None:
    """Run this host's worker or parameter server (from ``TF_CONFIG``) until killed."""
    import tensorflow as tf

    if cluster_resolver is None:
        if not os.environ.get("TF_CONFIG"):
            raise UserError("tfdlrm server needs TF_CONFIG naming the cluster and this task (see docs/parallelism.md)")
        check_tf_config()
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    task_type, task_id = cluster_resolver.task_type, cluster_resolver.task_id
    if task_type not in ("worker", "ps"):
        raise UserError(f"tfdlrm server runs a 'worker' or 'ps' task; TF_CONFIG's task is {task_type!r} "
                        f"(the chief runs tfdlrm train --parallel ps)")
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    print(listening_notice(task_type, task_id, cluster_resolver.cluster_spec().as_dict()), flush=True)
    try:
        server = tf.distribute.Server(cluster_resolver.cluster_spec(), job_name=task_type, task_index=task_id,
                                      protocol=cluster_resolver.rpc_layer or "grpc", start=True)
    except tf.errors.OpError as e:  # a bad address, a port in use
        from tfdlrm.errors import io_error_text

        raise UserError(f"cannot start the {task_type} {task_id} server: {io_error_text(e)}") from None
    print(f"tfdlrm: {task_type} {task_id} serving at {server.target}", flush=True)
    server.join()


def listening_notice(task_type: str, task_id: int, cluster: dict) -> str:
    """What ``tfdlrm server`` prints before it serves: its port, and who can reach it."""
    port = cluster[task_type][task_id].rpartition(":")[2]
    if os.environ.get(NETWORK_ENV) == "private":
        return (f"tfdlrm: {task_type} {task_id} listens on port {port} inside tfdlrm cluster's private network "
                f"namespace (reachable from the cluster's own processes only)")
    return (f"tfdlrm: {task_type} {task_id} listens on port {port} on EVERY network interface of this host. "
            f"TensorFlow's gRPC server authenticates no one: whoever reaches port {port} can run any TensorFlow "
            f"op in this process, reading and writing files as this user. Let only the cluster's hosts reach it "
            f"(a firewall or a private network: docs/parallelism.md, Security).")


# A worker's task index in its TF_CONFIG: {"task": {..., "index": N, ...}} (keys in any order).
_TASK_INDEX = r'(?s).*"task"\s*:\s*\{[^}]*"index"\s*:\s*(\d+)[^}]*\}.*'


def worker_shard(data, workers: int, environ: str = "/proc/self/environ"):
    """The batches of ``data`` that this worker trains on under ``--parallel ps``: every ``workers``-th,
    from its task index, which the dataset reads on the worker from its own environment's TF_CONFIG
    (``environ``, Linux's ``/proc/self/environ``; index 0 when it names none).

    ParameterServerStrategy traces the dataset function once and gives every worker the same input
    context (one pipeline, index 0), so a shard by that context, or a seed alone, gave every worker
    the same batches in the same order: each batch trained once per worker while an epoch's steps
    reached 1/workers of the rows (kaggle_split, 2 workers, Adagrad: test AUC 0.677-0.700 against
    0.739-0.742 in one process; with this shard 0.725-0.739). Every worker reads and parses the
    whole stream and keeps its share; a faster worker goes round its share again while the other's
    last batches wait for the next epoch.
    """
    import tensorflow as tf

    if workers <= 1:
        return data
    # the default first: the pattern's greedy start matches the last "task", TF_CONFIG's when there is one
    text = tf.strings.join(['"task": {"index": 0}\0', tf.io.read_file(environ)])
    index = tf.strings.to_number(tf.strings.regex_replace(text, _TASK_INDEX, r"\1"), tf.int64)
    return data.shard(workers, tf.math.floormod(index, workers))
