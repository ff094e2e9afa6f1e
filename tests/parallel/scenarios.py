"""Scenarios of tests/parallel/test_parallel.py that need their own TensorFlow process.

Logical devices can only be made before TensorFlow's runtime starts, and an
in-process cluster cannot be stopped, so each scenario runs as

    PYTHONPATH=REPO python tests/parallel/scenarios.py SCENARIO DEVICES 'JSON ARGS'

and prints one line ``RESULT <json>`` for the test to check.
"""
from __future__ import annotations

import json
import os
import sys

import tfdlrm  # noqa: F401  (selects Keras 2 before tf.keras is first used)
from tfdlrm.parallel.setup import configure_devices, make_parallel


# -- helpers ------------------------------------------------------------------------------------------------------
def small_config(rows=(300,) * 5 + (3000,), **changes):
    from tfdlrm.presets import get_preset

    return get_preset("tiny").replace(table_rows=tuple(rows), **changes)


def numpy_batches(config, examples: int, batch_size: int, seed: int = 0):
    """A fixed dataset (the last batch short when ``examples % batch_size``)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = {"dense": rng.random((examples, config.num_dense)).astype(np.float32),
         "sparse": np.stack([rng.integers(0, r, examples) for r in config.table_rows], 1).astype(np.int64)}
    y = rng.integers(0, 2, (examples, 1)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def build(mode, devices, config, model_name="dlrm", optimizer="adagrad", lr=0.1, budget=None, seed=7):
    import tensorflow as tf

    from tfdlrm.training.compile import build_model, compile_model

    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    setup = make_parallel(mode, devices, config, budget, model_name)
    with setup.scope():
        model = build_model(model_name, config)
        compile_model(model, optimizer, lr)
    setup.attach(model)
    return setup, model


def canonical_weights(model) -> dict:
    """Weights by role, a row-split table whole: comparable across placements."""
    import numpy as np

    out = {f"table_{f}": np.asarray(t.numpy()) for f, t in enumerate(model.sparse_arch.tables)}
    tables = {v.ref() for v in model.embedding_variables}  # MD projections count as dense weights
    dense = [v for v in model.trainable_variables if v.ref() not in tables]
    out.update({f"dense_{i}_{v.name}": v.numpy() for i, v in enumerate(dense)})
    return out


def accumulators(model) -> dict:
    return {f"acc_{f}": model.optimizer.get_slot(t, "accumulator").numpy()
            for f, t in enumerate(model.sparse_arch.tables)}


def max_diff(a: dict, b: dict) -> float:
    import numpy as np

    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return float(max(np.max(np.abs(a[k] - b[k])) for k in a))


def fit_losses(model, data, epochs=1) -> list[float]:
    import tensorflow as tf

    losses = []
    record = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: losses.append(float(logs["loss"])))
    model.fit(data, epochs=epochs, verbose=0, callbacks=[record])
    return losses


def same_device(a: str, b: str) -> bool:
    import tensorflow as tf

    x, y = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return (x.device_type or "").upper() == (y.device_type or "").upper() and x.device_index == y.device_index


# -- scenarios ----------------------------------------------------------------------------------------------------
def placement(args: dict) -> dict:
    """Where each table's variable, slots, gathers and updates are, against the plan."""
    config = small_config()
    data = numpy_batches(config, 64, 32)
    out = {"optimizers": {}}
    for optimizer in ("adagrad", "sgd"):
        setup, model = build("hybrid", 4, config, optimizer=optimizer, budget=args["budget"])
        model.fit(data, epochs=1, verbose=0)
        graph = model.train_function.get_concrete_function(iter(data)).graph
        inner = {id(outer): placeholder for outer, placeholder in graph.captures}
        records = []
        for f, table in enumerate(model.sparse_arch.tables):
            planned = setup.plan.tables[f]
            shards = table.variables if getattr(table, "is_sharded_variable", False) else [table]
            for shard_index, (variable, shard) in enumerate(zip(shards, planned.shards)):
                handle = inner[id(variable.handle)]
                consumers = [op for op in graph.get_operations() if any(t is handle for t in op.inputs)]
                slots = [model.optimizer.get_slot(variable, name).device
                         for name in model.optimizer.get_slot_names()]
                records.append({
                    "table": planned.name, "shard": shard_index, "planned": shard.device,
                    "rows": int(variable.shape[0]), "planned_rows": shard.rows,
                    "variable": variable.device, "slots": slots,
                    "ops": [[op.type, op.device] for op in consumers],
                })
        matmuls = {}
        for op in graph.get_operations():
            if op.type == "MatMul":
                matmuls[op.device] = matmuls.get(op.device, 0) + 1
        out["optimizers"][optimizer] = {"records": records, "matmul_devices": matmuls,
                                        "devices": setup.devices}
    return out


def equivalence(args: dict) -> dict:
    """Losses and weights of hybrid (4 devices), mirrored (4) and one device, same seed and data."""
    config = small_config()
    # 3 batches of 24 and a last one of 6: slices of 6 per device, then 2, 2, 1, 1.
    data = numpy_batches(config, 78, 24)
    runs = {}
    for name, mode, devices, budget in (("one", "none", 1, None), ("hybrid", "hybrid", 4, args["budget"]),
                                        ("mirrored", "mirrored", 4, None)):
        setup, model = build(mode, devices, config, budget=budget)
        initial = canonical_weights(model)
        losses = fit_losses(model, data, epochs=args["epochs"])
        runs[name] = {"initial": initial, "losses": losses, "weights": canonical_weights(model),
                      "accumulators": accumulators(model), "split": [t.name for t in (setup.plan.tables if
                                                                                        setup.plan else [])
                                                                        if t.split]}
    dcn = {}
    for name, mode, devices in (("one", "none", 1), ("hybrid", "hybrid", 4)):
        setup, model = build(mode, devices, config, model_name="dcn", budget=args["budget"])
        dcn[name] = {"losses": fit_losses(model, data), "weights": canonical_weights(model)}
    one = runs["one"]
    return {
        "losses": {k: v["losses"] for k, v in runs.items()},
        "split_tables": runs["hybrid"]["split"],
        "initial_diff": {k: max_diff(v["initial"], one["initial"]) for k, v in runs.items()},
        "weight_diff": {k: max_diff(v["weights"], one["weights"]) for k, v in runs.items()},
        "accumulator_diff": {k: max_diff(v["accumulators"], one["accumulators"]) for k, v in runs.items()},
        "moved": max_diff(one["weights"], one["initial"]),
        "dcn_losses": {k: v["losses"] for k, v in dcn.items()},
        "dcn_weight_diff": max_diff(dcn["hybrid"]["weights"], dcn["one"]["weights"]),
    }


def table_kinds(args: dict) -> dict:
    """QR and MD tables (issue 25): hybrid on 4 devices, a QR part split by rows, against one device."""
    config = small_config(rows=(300, 300, 300, 300, 1000, 3000), qr_collisions=4, qr_threshold=2000,
                          md_temperature=0.5, md_threshold=200)
    data = numpy_batches(config, 78, 24)
    runs = {}
    for name, mode, devices in (("one", "none", 1), ("hybrid", "hybrid", 4)):
        setup, model = build(mode, devices, config, budget=args["budget"])
        initial = canonical_weights(model)
        runs[name] = {"initial": initial, "losses": fit_losses(model, data), "weights": canonical_weights(model),
                      "plan": [[t.name, t.rows, t.dim, len(t.shards)] for t in (setup.plan.tables if setup.plan
                                                                                 else [])]}
    one = runs["one"]
    return {"losses": {k: v["losses"] for k, v in runs.items()}, "plan": runs["hybrid"]["plan"],
            "initial_diff": max_diff(runs["hybrid"]["initial"], one["initial"]),
            "weight_diff": max_diff(runs["hybrid"]["weights"], one["weights"]),
            "moved": max_diff(one["weights"], one["initial"])}


def resume(args: dict) -> dict:
    """Restore a one-device checkpoint (weights and Adagrad slots) into hybrid on these
    devices with a row-split table; train on; compare with the one-device run."""
    import numpy as np

    config = small_config()
    data = numpy_batches(config, 96, 32, seed=args["data_seed"])
    setup, model = build("hybrid", args["count"], config, budget=args["budget"], seed=99)
    model.load_weights(args["checkpoint"])
    saved = dict(np.load(args["saved"]))
    restored = {**canonical_weights(model), **accumulators(model)}
    steps_before = int(model.optimizer.iterations.numpy())
    model.fit(data, epochs=1, verbose=0)
    continued = dict(np.load(args["continued"]))
    return {
        "split_tables": [t.name for t in setup.plan.tables if t.split],
        "devices": setup.devices,
        "restore_diff": max_diff(restored, saved),
        "continue_diff": max_diff(canonical_weights(model), continued),
        "steps_before": steps_before,
    }


def ps_cluster(args: dict) -> dict:
    """2 workers and 2 parameter servers in this process, on 127.0.0.1 of its private network namespace
    (``main`` enters it); this process is the chief."""
    import numpy as np
    import tensorflow as tf

    from tfdlrm.parallel.cluster import cluster_spec
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.training.compile import build_model, compile_model
    from tfdlrm.training.evaluate import evaluate

    cluster = cluster_spec(workers=2, ps=2)  # distinct free ports on 127.0.0.1, as tfdlrm cluster picks them
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
    spec = tf.train.ClusterSpec(cluster)
    for job in ("worker", "ps"):
        for index in range(len(cluster[job])):
            config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=4, intra_op_parallelism_threads=1)
            tf.distribute.Server(spec, job_name=job, task_index=index, protocol="grpc", config=config, start=True)

    config = small_config(rows=(1000,) * 26)
    setup = make_parallel("ps", None, config)  # TF_CONFIG's cluster
    with setup.scope():
        model = build_model("dlrm", config)
        compile_model(model, "adagrad", 0.05, metrics=False)
    setup.attach(model)
    before = {v.name + str(i): v.numpy() for i, v in enumerate(model.trainable_variables)}
    source = open_data("synthetic", config, train_examples=20 * 1024, eval_examples=2048)
    data = tf.keras.utils.experimental.DatasetCreator(
        lambda context: source.train_dataset(256, seed=1, input_context=context).repeat())
    model.fit(data, epochs=2, steps_per_epoch=4, verbose=0)
    shards = []
    for f, table in enumerate(model.sparse_arch.tables):
        parts = table.variables if getattr(table, "is_sharded_variable", False) else [table]
        for part in parts:
            index = [i for i, v in enumerate(model.trainable_variables) if v is part][0]
            shards.append({"table": f, "device": part.device, "rows": int(part.shape[0]),
                           "changed": bool(np.any(part.numpy() != before[part.name + str(index)])),
                           "slot_device": model.optimizer.get_slot(part, "accumulator").device})
    dense = [{"device": v.device, "sharded": bool(getattr(v, "_sharded_container", None))}
             for v in model.trainable_variables if "table" not in v.name]
    evaluation = evaluate(model, source.eval_dataset(1024))
    return {"shards": shards, "dense": dense, "steps": int(model.optimizer.iterations.numpy()),
            "auc": evaluation.auc, "examples": evaluation.examples}


SCENARIOS = {f.__name__: f for f in (placement, equivalence, table_kinds, resume, ps_cluster)}


def main() -> None:
    name, devices, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
    if devices != "cluster":
        configure_devices(int(devices))  # before TensorFlow starts
    else:  # the servers' ports private to this process (before TensorFlow starts any thread)
        from tfdlrm.parallel.netns import NoPrivateNetwork, enter_private_network

        try:
            enter_private_network()
        except NoPrivateNetwork as e:
            print("RESULT " + json.dumps({"skip": f"no private network here: {e}"}), flush=True)
            return
    result = SCENARIOS[name](args)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # in-process servers never stop on their own


if __name__ == "__main__":
    main()
