"""TensorFlow's two thread pools, chosen by the batch size (``--threads``).

TensorFlow runs independent ops side by side on its *inter-op* pool and splits one op over
its *intra-op* pool; by default both have a thread per core.  At small batches a step is
a chain of small matmuls that oneDNN does not split well over threads (a batch-128 layer of
the kaggle top MLP took longer on two threads than on one), while each layer's two
gradient products, the embedding rows and the dense weights' updates are independent of
one another: one thread an op, several ops at once, is faster there (batch 128, ``train`` from a
converted dataset: 4.95 against 5.62 ms a step).  At 512 the two were level within the noise, and
at 1024 and 2048 splitting each matmul wins.  The figures are in docs/benchmarks.md.

The pools can only be sized before TensorFlow's runtime starts: ``train`` and ``bench
train`` call :func:`use_thread_pools` first.  ``TF_NUM_INTRAOP_THREADS`` /
``TF_NUM_INTEROP_THREADS`` in the environment are TensorFlow's own settings and win.
"""
from __future__ import annotations

import os
from typing import Optional

from tfdlrm.errors import UserError

THREADS = ("auto", "tf")
# Largest batch that runs one thread an op (``--threads auto``); measured on 2 cores.
SMALL_BATCH = 256
ENVIRONMENT = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def thread_pools(batch_size: int, threads: str = "auto", parallel_mode: Optional[str] = None) -> Optional[dict]:
    """``{"intra_op": n, "inter_op": m}`` for ``threads="auto"`` at a small batch on one device,
    or None: TensorFlow's own sizes (``threads="tf"``, large batches, multi-device modes,
    whose steps are built differently, or pools set in the environment)."""
    if threads not in THREADS:
        raise UserError(f"--threads must be one of {', '.join(THREADS)}, got {threads!r}")
    if threads == "tf" or parallel_mode not in (None, "none") or any(os.environ.get(v) for v in ENVIRONMENT):
        return None
    if int(batch_size) > SMALL_BATCH or cores() < 2:
        return None
    return {"intra_op": 1, "inter_op": cores()}


def use_thread_pools(batch_size: int, threads: str = "auto", parallel_mode: Optional[str] = None) -> str:
    """Size TensorFlow's pools as :func:`thread_pools` says; returns what the step runs on, for
    the run's log line.  Too late (the runtime has started in this process, say a second model
    of a notebook): TensorFlow's current pools stay, and the line says so."""
    import tensorflow as tf

    pools = thread_pools(batch_size, threads, parallel_mode)
    current = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    if pools is None:
        return describe(current)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(pools["intra_op"])
        tf.config.threading.set_inter_op_parallelism_threads(pools["inter_op"])
    except RuntimeError:  # the runtime is running: its pools are fixed for this process
        if current != pools:
            return describe(current) + " (TensorFlow had started; " + describe(pools) + " would be faster)"
    return describe(pools)


def describe(pools: dict) -> str:
    """``threads: intra-op N, inter-op M``; 0 (not set) is TensorFlow's default, or the environment's."""
    def one(n: int, variable: str):
        return n or os.environ.get(variable) or "TensorFlow's default"

    return (f"threads: intra-op {one(pools['intra_op'], 'TF_NUM_INTRAOP_THREADS')}, "
            f"inter-op {one(pools['inter_op'], 'TF_NUM_INTEROP_THREADS')}")
