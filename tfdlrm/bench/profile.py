"""``bench train --profile``: where a step's time goes, grouped by part of the step."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def _profile(net, dataset, logdir: str, steps: int, log) -> list:
    """A TensorBoard profile of ``steps`` more steps in ``logdir``, and the top ops by time per step."""
    import tensorflow as tf

    Path(logdir).mkdir(parents=True, exist_ok=True)
    tf.profiler.experimental.start(logdir)
    net.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    tf.profiler.experimental.stop()
    top = top_ops(logdir, steps, limit=None)
    log(f"profile in {logdir} (TensorBoard's Profile tab); milliseconds per step in ops, summed over threads "
        f"(ops that run at the same time each count their own duration):")
    for name, ms in categorize(top):
        log(f"  {ms:8.2f}  {name}")
    log("top ops:")
    for row in top[:20]:
        log(f"  {row['ms_per_step']:8.2f}  {row['op']}")
    return {"categories": [{"part": name, "ms_per_step": round(ms, 2)} for name, ms in categorize(top)],
            "top_ops": top[:40]}


def categorize(top: list) -> list:
    """Op times per step grouped by what they do in a DLRM/DCN step, largest first."""
    import collections
    import re

    parts: collections.Counter = collections.Counter()
    for row in top:
        name, ms = row["op"], row["ms_per_step"]
        op, _, kind = name.partition(":")
        if not kind:  # an XLA thunk (fusion) name
            if "scatter" in op:
                part = "embedding row updates (XLA scatter)"
            elif "gather" in op or op.startswith("stack"):
                part = "embedding lookups (XLA gather)"
            elif re.match(r"(wrapped_)?reduce|reduce-window|ynn_fusion", op):
                part = "bag sums (XLA)"
            elif op.startswith(("MatMul", "maximum_dot", "dot")):
                part = "MLP matmuls (XLA)"
            else:
                part = "other compiled (XLA) work"
        elif kind in ("ResourceScatterAdd", "ResourceScatterSub", "ResourceSparseApplyAdagradV2", "Unique",
                      "UniqueV2", "UnsortedSegmentSum") and "interaction" not in op:
            part = "embedding row updates (TensorFlow)"
        elif kind in ("ResourceGather", "GatherV2") and "interaction" not in op:
            part = "embedding lookups (TensorFlow gather)"
        elif "interaction" in op:
            part = "dot interaction (forward and backward)"
        elif "Matmul" in kind or "MatMul" in kind:
            part = "MLP matmuls, backward" if op.startswith("gradient") else "MLP matmuls, forward"
        elif kind in ("BiasAddGrad", "ReluGrad", "Relu", "BiasAdd"):
            part = "MLP bias and ReLU (backward)"
        elif "sparse_arch" in op:
            part = "embedding layer: stack/unstack, id check"
        elif kind.startswith("ResourceApply") or "SGD" in op or "Adagrad" in op:
            part = "optimizer arithmetic (TensorFlow: -lr x gradient rows, dense weights)"
        elif "cross_net" in op:
            part = "DCN cross network (TensorFlow)"
        else:
            part = "other TensorFlow ops"
        parts[part] += ms
    return parts.most_common()


# Executor and thread-pool events that enclose op events (counting them would count twice).
_ENCLOSING = {"ThunkExecutor::Execute", "ExecutorState::Process", "ParallelFor", "SlinkyThreadPool::Await",
              "ExecutorState::ProcessAsync::Done", "ExecutorState::ProcessAsync::Start",
              "CpuExecutable::ExecuteAsyncOnStream", "BlockUntilReady"}


def top_ops(logdir: str, steps: int, limit: Optional[int] = 40) -> list:
    """Op (or XLA thunk) time per step from the newest ``*.xplane.pb`` under ``logdir``,
    summed over the worker threads, largest first.  Empty if the profiler's protobufs
    are not importable."""
    import collections
    import glob

    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:  # pragma: no cover
        return []
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return []
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(files[-1]).read_bytes())
    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python" or "tf_data" in line.name:
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name not in _ENCLOSING:
                    totals[name] += event.duration_ps / 1e9 / steps
    return [{"op": name, "ms_per_step": round(ms, 3)} for name, ms in totals.most_common(limit)]
