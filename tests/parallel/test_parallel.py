"""tfdlrm.parallel: the placement plan, hybrid and mirrored training over logical CPU
devices, checkpoints across device counts, parameter servers, and the commands.

Logical devices must exist before TensorFlow starts, so multi-device checks run in
fresh processes (tests/parallel/scenarios.py); this process has one CPU device (the plan
command and the errors found before any device is set up run here, through ``main``).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, assert_clean_error, run_cli
from tests.helpers.cli import run_main
from tests.parallel import scenarios
from tfdlrm.errors import UserError
from tfdlrm.layers.embedding import EmbeddingTables
from tfdlrm.parallel.devices import parse_bytes, parse_devices
from tfdlrm.parallel.hybrid import HybridRunner
from tfdlrm.parallel.plan import PlacementPlan, Shard, TablePlacement, plan_placement
from tfdlrm.parallel.setup import configure_devices
from tfdlrm.training.rundir import load_run

D = [f"/device:CPU:{k}" for k in range(4)]


def run_scenario(name, devices, timeout=300, **args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, scenarios.__file__, name, str(devices),
                           json.dumps(args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def where(plan):
    return {t.name: [(s.device, s.start, s.stop) for s in t.shards] for t in plan.tables}


# -- the plan ------------------------------------------------------------------------------------------------------
def test_plan_balances_bytes_greedily_largest_table_first():
    # dim 4 -> 16 bytes a row: C1 1600, C2 6400, C3 4800, C4 4000, C5 800 bytes.
    # Largest first onto the emptiest device: C2->0, C3->1, C4->2, C1->2 (4000 < 4800), C5->1 (4800 < 5600).
    plan = plan_placement([100, 400, 300, 250, 50], 4, D[:3])
    assert where(plan) == {"C1": [(D[2], 0, 100)], "C2": [(D[0], 0, 400)], "C3": [(D[1], 0, 300)],
                           "C4": [(D[2], 0, 250)], "C5": [(D[1], 0, 50)]}
    assert plan.bytes_per_device() == {D[0]: 6400, D[1]: 5600, D[2]: 5600}
    assert plan.tables_per_device() == {D[0]: ["C2"], D[1]: ["C3", "C5"], D[2]: ["C1", "C4"]}


def test_a_table_over_the_budget_is_split_by_rows():
    # C1 is 16000 bytes, over the 12000 budget: two halves on the two emptiest devices;
    # C2 (4800) and C3 (3200) then both fit on the third.
    plan = plan_placement([1000, 300, 200], 4, D[:3], budget=12_000)
    assert where(plan) == {"C1": [(D[0], 0, 500), (D[1], 500, 1000)], "C2": [(D[2], 0, 300)],
                           "C3": [(D[2], 0, 200)]}
    assert plan.bytes_per_device() == {D[0]: 8000, D[1]: 8000, D[2]: 8000}
    # Uneven rows split as TensorFlow's "div" partitioning: the first shard one row larger.
    odd = plan_placement([1001], 1, D[:2], budget=2100)
    assert where(odd) == {"C1": [(D[0], 0, 501), (D[1], 501, 1001)]}


def test_a_table_that_fits_the_budget_but_not_the_room_left_is_split():
    # 9600 bytes each, budget 15000: C1 and C2 fill one device each, C3 goes half and half.
    plan = plan_placement([600, 600, 600], 4, D[:2], budget=15_000)
    assert where(plan) == {"C1": [(D[0], 0, 600)], "C2": [(D[1], 0, 600)], "C3": [(D[0], 0, 300), (D[1], 300, 600)]}
    assert max(plan.bytes_per_device().values()) <= 15_000


def test_a_plan_that_cannot_fit_is_a_user_error():
    with pytest.raises(UserError, match=r"cannot place table C1 .*raise --budget or use more --devices"):
        plan_placement([1000], 4, D[:2], budget=7000)  # halves of 8000 bytes
    with pytest.raises(UserError, match="at least one device"):
        plan_placement([10], 4, [])


def test_device_and_byte_arguments():
    assert parse_devices("4") == 4
    assert parse_devices("GPU:0,gpu:1") == ["/device:GPU:0", "/device:GPU:1"]
    assert parse_devices("/job:localhost/replica:0/task:0/device:CPU:2") == ["/device:CPU:2"]
    for bad in ("0", "-1", "TPU:0", "CPU:0,CPU:0", "CPU:0,GPU:1", ""):
        with pytest.raises(UserError):
            parse_devices(bad)
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1000") == 1000
    for bad in ("0", "lots", "5 parsecs"):
        with pytest.raises(UserError):
            parse_bytes(bad)


def test_devices_cannot_be_split_once_tensorflow_runs():
    tf.constant(1.0) + 1  # this process's runtime has started, with one CPU device
    with pytest.raises(UserError, match="already started with 1"):
        configure_devices(8)
    assert configure_devices(1) == ["/device:CPU:0"]


# -- row-split tables on one device ----------------------------------------------------------------------------------
def split_layer(rows, dim, shards_of_first):
    """EmbeddingTables whose first table is row-split into ``shards_of_first`` (all on CPU:0)."""
    tables = [TablePlacement("C1", rows[0], dim, tuple(Shard(D[0], a, b) for a, b in shards_of_first))]
    tables += [TablePlacement(f"C{i + 1}", r, dim, (Shard(D[0], 0, r),)) for i, r in enumerate(rows) if i]
    plan = PlacementPlan([D[0]], tables, dense_device=D[0])
    tf.keras.utils.set_random_seed(5)
    with HybridRunner(plan).scope():
        layer = EmbeddingTables(rows, dim)
        layer.build(tf.TensorShape([None, len(rows)]))
    tf.keras.utils.set_random_seed(5)
    whole = EmbeddingTables(rows, dim)
    whole.build(tf.TensorShape([None, len(rows)]))
    return layer, whole


def test_a_row_split_table_looks_up_and_learns_like_a_whole_one():
    rows, dim = [7, 3], 4
    layer, whole = split_layer(rows, dim, [(0, 3), (3, 5), (5, 7)])
    table = layer.tables[0]
    assert getattr(table, "is_sharded_variable", False) and [int(v.shape[0]) for v in table.variables] == [3, 2, 2]
    np.testing.assert_array_equal(table.numpy(), whole.tables[0].numpy())  # same initial values
    one_hot = np.array([[6, 2], [0, 0], [3, 1], [4, 2]], np.int64)
    bags = np.array([[[6, 0, 3], [1, 1, 2]], [[5, 5, 4], [0, 2, 0]]], np.int64)
    ragged = tf.ragged.constant([[[6, 0], [1]], [[], [2, 0, 1]]], dtype=tf.int64, ragged_rank=2)
    for ids in (one_hot, bags, ragged):
        np.testing.assert_array_equal(layer(ids).numpy(), whole(ids).numpy())
    with tf.GradientTape(persistent=True) as tape:
        out_split, out_whole = layer(one_hot), whole(one_hot)
        loss_split, loss_whole = tf.reduce_sum(out_split ** 2), tf.reduce_sum(out_whole ** 2)
    shard_grads = tape.gradient(loss_split, table.variables)
    assert all(isinstance(g, tf.IndexedSlices) for g in shard_grads)
    # each shard's gradient names only its own rows, in local row numbers
    assert sorted(shard_grads[0].indices.numpy()) == [0]  # id 0
    assert sorted(shard_grads[1].indices.numpy()) == [0, 1]  # ids 3 and 4
    assert sorted(shard_grads[2].indices.numpy()) == [1]  # id 6
    dense_split = np.concatenate([tf.convert_to_tensor(g).numpy() for g in shard_grads])
    dense_whole = tf.convert_to_tensor(tape.gradient(loss_whole, whole.tables[0])).numpy()
    np.testing.assert_allclose(dense_split, dense_whole, rtol=1e-6, atol=1e-7)


def test_a_row_split_table_still_checks_ids():
    layer, _ = split_layer([7, 3], 4, [(0, 4), (4, 7)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature C1 .* has 7 rows"):
        layer(np.array([[7, 0]], np.int64))


# -- several devices (fresh processes) -------------------------------------------------------------------------------
def test_hybrid_puts_each_table_its_slots_gathers_and_updates_on_its_planned_device():
    # tables of 9600 bytes and one of 96000: over a 60000-byte budget it is split in two
    result = run_scenario("placement", 4, budget=60_000)
    for optimizer, update_op in (("adagrad", "ResourceSparseApplyAdagradV2"), ("sgd", "ResourceScatterAdd")):
        got = result["optimizers"][optimizer]
        records = got["records"]
        assert {r["table"] for r in records} == {f"C{i}" for i in range(1, 7)}
        assert [(r["table"], r["shard"]) for r in records if r["shard"] > 0] == [("C6", 1)]
        assert len({r["planned"] for r in records}) == 4  # all four devices hold embeddings
        for r in records:
            where = f"{optimizer} {r['table']} shard {r['shard']}"
            assert r["rows"] == r["planned_rows"], where
            assert scenarios.same_device(r["variable"], r["planned"]), where
            assert all(scenarios.same_device(s, r["planned"]) for s in r["slots"]), where
            assert len(r["slots"]) == (1 if optimizer == "adagrad" else 0), where
            types = sorted(t for t, _ in r["ops"])
            assert types == sorted(["ResourceGather", update_op]), (where, r["ops"])
            for op_type, device in r["ops"]:
                assert device and scenarios.same_device(device, r["planned"]), (where, op_type, device)
        # the dense part runs on every device, forward and backward, on its slice of the batch
        matmuls = got["matmul_devices"]
        assert sorted(matmuls) == got["devices"] and len(set(matmuls.values())) == 1, matmuls


def test_hybrid_and_mirrored_on_four_devices_train_like_one_device():
    result = run_scenario("equivalence", 4, budget=60_000, epochs=2)
    assert result["split_tables"] == ["C6"]
    assert result["moved"] > 0.1  # training changed the weights, so agreeing means something
    losses = result["losses"]
    assert len(losses["one"]) == 8  # 2 epochs of 4 batches, the last of 6 examples
    for mode in ("hybrid", "mirrored"):
        np.testing.assert_allclose(losses[mode], losses["one"], rtol=0, atol=1e-5, err_msg=mode)
        assert result["initial_diff"][mode] == 0.0, mode
        assert result["weight_diff"][mode] < 1e-5, (mode, result["weight_diff"])
        assert result["accumulator_diff"][mode] < 1e-5, (mode, result["accumulator_diff"])
    np.testing.assert_allclose(result["dcn_losses"]["hybrid"], result["dcn_losses"]["one"], rtol=0, atol=1e-5)
    assert result["dcn_weight_diff"] < 1e-5


def test_qr_and_md_tables_place_each_part_like_a_table_and_hybrid_trains_like_one_device():
    result = run_scenario("table_kinds", 4, budget=20_000)
    plan = {name: (rows, dim, shards) for name, rows, dim, shards in result["plan"]}
    # a QR table's quotient and remainder, an MD table's rows and projection: each a table of the plan,
    # the quotient (24,000 bytes) split by rows over the 20,000-byte budget
    assert plan["C6_quotient"] == (750, 8, 2) and plan["C6_remainder"] == (4, 8, 1)
    assert plan["C5"] == (1000, 4, 1) and plan["projection_C5"] == (4, 8, 1)
    assert result["moved"] > 0.1 and result["initial_diff"] == 0.0
    np.testing.assert_allclose(result["losses"]["hybrid"], result["losses"]["one"], rtol=0, atol=1e-5)
    assert result["weight_diff"] < 1e-5


def test_a_checkpoint_from_four_devices_loads_as_a_one_device_model(tmp_path):
    out = tmp_path / "run"
    # 26 tables of 32000 bytes; a 220000-byte budget fills the devices unevenly, so some
    # tables are split by rows.
    proc = run_cli("train", "--devices", "4", "--budget", "220000", "--preset", "tiny", "--train-examples", "10240",
                   "--eval-examples", "4096", "--batch-size", "512", "--optimizer", "adagrad", "--lr", "0.05",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hybrid over 4 device(s)" in proc.stdout
    assert "split by rows over" in proc.stdout, proc.stdout
    model, meta = load_run(str(out))
    assert meta["spec"]["devices"] == 4 and meta["spec"]["budget"] == 220000
    assert not any(getattr(t, "is_sharded_variable", False) for t in model.sparse_arch.tables)
    assert {v.device for v in model.weights} == {model.weights[0].device}  # plain, one device
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.presets import get_preset
    from tfdlrm.training.evaluate import evaluate

    data = open_data("synthetic", get_preset("tiny"), train_examples=10240, eval_examples=4096)
    again = evaluate(model, data.eval_dataset(4096))
    trained = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert again.logloss == pytest.approx(trained["logloss"], abs=1e-6)
    assert again.auc == pytest.approx(trained["auc"], abs=1e-6)


def test_a_checkpoint_from_one_device_resumes_on_two_with_a_row_split_table(tmp_path):
    config = scenarios.small_config()
    data = scenarios.numpy_batches(config, 96, 32, seed=3)
    _, model = scenarios.build("none", 1, config)
    model.fit(data, epochs=1, verbose=0)
    model.save_weights(str(tmp_path / "ckpt" / "one"))
    np.savez(tmp_path / "saved.npz", **scenarios.canonical_weights(model), **scenarios.accumulators(model))
    model.fit(data, epochs=1, verbose=0)
    np.savez(tmp_path / "continued.npz", **scenarios.canonical_weights(model))
    result = run_scenario("resume", 2, count=2, budget=80_000, data_seed=3, checkpoint=str(tmp_path / "ckpt" / "one"),
                          saved=str(tmp_path / "saved.npz"), continued=str(tmp_path / "continued.npz"))
    assert result["devices"] == D[:2] and result["split_tables"] == ["C6"]
    assert result["restore_diff"] == 0.0  # weights and Adagrad accumulators, the split table's too
    assert result["steps_before"] == 3
    assert result["continue_diff"] < 1e-5  # three more steps there = three more steps here


def test_parameter_servers_hold_table_shards_and_all_are_updated():
    result = run_scenario("ps_cluster", "cluster", timeout=240)
    if "skip" in result:
        pytest.skip(result["skip"])
    shards = result["shards"]
    assert {s["table"] for s in shards} == set(range(26))
    for table in range(26):
        mine = [s for s in shards if s["table"] == table]
        devices = {tf.DeviceSpec.from_string(s["device"]).task for s in mine}
        assert len(mine) == 2 and devices == {0, 1}, mine  # one shard on each parameter server
        assert all("/job:ps/" in s["device"] for s in mine)
        assert sum(s["rows"] for s in mine) == 1000
        assert all(s["changed"] for s in mine), mine
        assert all(s["slot_device"] == s["device"] for s in mine), mine
    assert not any(d["sharded"] for d in result["dense"])  # only tables are partitioned
    assert result["steps"] == 8 and result["examples"] == 2048


# -- commands ---------------------------------------------------------------------------------------------------------
def test_plan_command_prints_each_table_and_bytes_per_device():
    proc = run_main(["plan", "--preset", "tiny", "--devices", "3", "--json"])
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    from tfdlrm.presets import get_preset

    expected = plan_placement(get_preset("tiny").table_rows, 8, D[:3]).to_dict()
    assert printed["tables"] == expected["tables"] and printed["bytes_per_device"] == expected["bytes_per_device"]
    assert sorted(printed["bytes_per_device"].values()) == [256_000, 288_000, 288_000]
    text = run_main(["plan", "--preset", "kaggle", "--rows", "100000", "--devices", "2", "--budget", "90MB"])
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(line.split()[:4] == ["C1", "100,000", "6,400,000", "/device:CPU:0"] for line in lines), text.stdout
    assert any(line.split()[:3] == ["/device:CPU:1", "13", "83,200,000"] for line in lines), text.stdout


def test_bench_parallel_reports_one_two_and_four_devices():
    proc = run_cli("bench", "parallel", "--preset", "tiny", "--rows", "1000", "--batch-size", "256", "--steps", "2",
                   "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [r["devices"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert len(r["bytes_per_device"]) == r["devices"]
        assert sum(r["bytes_per_device"].values()) == 26 * 1000 * 8 * 4
        assert r["step_ms"] > 0 and r["mode"] == "hybrid"


@pytest.mark.parametrize("args, fragments", [
    (["train", "--devices", "0"], ["--devices", "positive device count"]),
    (["train", "--devices", "TPU:0"], ["--devices", "TPU:0"]),
    (["train", "--parallel", "data"], ["--parallel", "invalid choice"]),
    (["train", "--devices", "2", "--parallel", "none"], ["--parallel none", "hybrid or mirrored"]),
    (["train", "--parallel", "ps"], ["--parallel ps", "--steps-per-epoch"]),
    (["train", "--parallel", "ps", "--steps-per-epoch", "2"], ["TF_CONFIG"]),
    (["train", "--parallel", "mirrored", "--budget", "1MB"], ["--budget", "hybrid"]),
    (["train", "--budget", "lots"], ["--budget", "'lots'"]),
    (["train", "--devices", "4", "--budget", "40000", "--train-examples", "2048", "--eval-examples", "1024"],
     ["cannot place table", "raise --budget or use more --devices"]),
    (["plan", "--devices", "2", "--budget", "1000"], ["cannot place table C1"]),
    (["plan", "--devices", "0"], ["--devices", "positive"]),
    (["bench", "parallel", "--device-counts", "0,2"], ["device counts must be positive"]),
    (["server"], ["TF_CONFIG"]),
])
def test_bad_parallel_input_gives_one_line_errors(args, fragments, monkeypatch):
    if args[:3] == ["train", "--devices", "4"]:  # the plan is made once 4 devices exist: a fresh process
        proc = run_cli(*args, env={"TF_CONFIG": ""})
    else:  # refused before any device is set up: in this process
        monkeypatch.setenv("TF_CONFIG", "")
        proc = run_main(args)
    assert_clean_error(proc, *fragments)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="this machine has a GPU")
def test_asking_for_a_gpu_on_a_cpu_machine_is_a_user_error():
    assert_clean_error(run_main(["train", "--devices", "GPU:0,GPU:1"]), "2 GPU(s)", "has 0")
