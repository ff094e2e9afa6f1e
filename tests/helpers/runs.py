"""Comparing training runs in tests: a checkpoint's tensors, and two run directories."""
from __future__ import annotations

import json

import numpy as np

SAME_RUN_KEYS = ("evaluation", "history", "curve", "examples", "params")


def checkpoint_tensors(prefix) -> dict:
    """Every tensor of a checkpoint (weights, optimizer slots, step counter) by name."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]


def assert_same_run(a_dir, b_dir, keys=SAME_RUN_KEYS) -> None:
    """Same final checkpoint (epoch 2), bit for bit, and the same metrics.json ``keys`` (apart from
    timings and resumes)."""
    assert_same_tensors(checkpoint_tensors(a_dir / "checkpoints" / "epoch-002"),
                        checkpoint_tensors(b_dir / "checkpoints" / "epoch-002"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (a_dir, b_dir))
    for key in keys:
        assert a[key] == b[key], key
