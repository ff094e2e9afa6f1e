"""Which batches a --parallel ps worker trains on (tfdlrm/parallel/ps.py ``worker_shard``): its task index
read from its own environment's TF_CONFIG, so that workers of one trace read disjoint batches."""
import json

import tensorflow as tf

from tfdlrm.parallel.ps import worker_shard


def environ_file(path, **variables):
    path.write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in variables.items()) + b"\0")
    return str(path)


def batches(data):
    return [int(x) for x in data.as_numpy_iterator()]


def test_each_worker_keeps_every_nth_batch_from_its_index(tmp_path):
    data = tf.data.Dataset.range(10)
    cluster = {"worker": ["a:1", "b:2", "c:3"], "ps": ["d:4"]}
    seen = []
    for index in range(3):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        seen.append(batches(worker_shard(data, 3, environ_file(tmp_path / f"env{index}", PATH="/bin",
                                                                 TF_CONFIG=config, HOME="/root"))))
    assert seen == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # disjoint, together every batch once
    # keys in another order, other spacing
    odd = '{"task":{"index":1,"type":"worker"},"cluster":{}}'
    assert batches(worker_shard(data, 2, environ_file(tmp_path / "odd", TF_CONFIG=odd))) == [1, 3, 5, 7, 9]
    # no TF_CONFIG (an in-process server): index 0; one worker: everything
    assert batches(worker_shard(data, 2, environ_file(tmp_path / "none", PATH="/bin"))) == [0, 2, 4, 6, 8]
    assert batches(worker_shard(data, 1, "/nonexistent")) == list(range(10))
