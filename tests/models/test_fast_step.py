"""What the training speed depends on (issue 7), checked without timing anything:

* the fast step (tfdlrm/fast.py) updates only the looked-up rows, in place, and
  creates no table-sized optimizer state; it trains exactly like Keras's stock step;
* the parts asked to compile with XLA do (and ``xla="off"`` compiles nothing);
* out-of-range ids still raise an error naming the feature, before any update;
* bf16 keeps every variable (embedding tables included) float32 and stays close to float32.
"""
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_cli
from tfdlrm.errors import UserError
from tfdlrm.models.fast_step import native_bf16, resolve_mixed_precision, resolve_xla
from tfdlrm.presets import get_preset
from tfdlrm.training.compile import build_model, compile_model


def batch(config, n=64, seed=0, ids_in_use=None):
    rng = np.random.default_rng(seed)
    shape = (n, config.num_tables) + ((config.ids_per_lookup,) if config.ids_per_lookup > 1 else ())
    if ids_in_use is None:
        sparse = np.stack([rng.integers(0, r, size=shape[:1] + shape[2:]) for r in config.table_rows], axis=1)
    else:
        sparse = rng.choice(ids_in_use, size=shape)
    x = {"dense": rng.random((n, config.num_dense)).astype(np.float32), "sparse": sparse.astype(np.int64)}
    return x, rng.integers(0, 2, (n, 1)).astype(np.float32)


def built(config, optimizer="sgd", xla="sparse", model="dlrm", mixed_precision=None, seed=5, lr=0.1):
    tf.keras.utils.set_random_seed(seed)
    net = build_model(model, config, mixed_precision=mixed_precision)
    compile_model(net, optimizer, lr, metrics=False, xla=xla)
    return net


def fit_batches(net, batches):
    losses = []
    for x, y in batches:
        losses.append(float(net.train_on_batch(x, y, reset_metrics=True)))
    return losses


# -- sparse, in-place updates --------------------------------------------------------------------------------------
@pytest.mark.parametrize("xla", ["sparse", "full"])
def test_fast_sgd_step_touches_only_looked_up_rows_and_makes_no_table_slots(xla):
    config = get_preset("tiny", rows=50, embedding_dim=4, bottom_mlp=(13, 8, 4), top_mlp=(8, 1))
    config = config.replace(table_rows=(1_000_000,) + (50,) * 25)
    net = built(config, "sgd", xla)
    used = np.array([0, 17, 999_999])
    x, y = batch(config, 32, ids_in_use=used)
    x["sparse"][:, 1:] %= 50
    big = net.sparse_arch.tables[0]
    before = big.numpy()
    net.train_on_batch(x, y)
    changed = np.flatnonzero(np.any(before != big.numpy(), axis=1))
    assert 0 < len(changed) and set(changed) <= set(x["sparse"][:, 0])
    # SGD keeps no state beside its step counter: nothing table-sized.
    assert [tuple(v.shape) for v in net.optimizer.variables()] == [()]
    # The compiled parts work in place: the big table's buffer is an input aliased to
    # its output, and every instruction of the table's shape is a parameter or a row
    # scatter into it (no copy, no dense update of the table).
    for name in ("lookup", "rows") if xla == "sparse" else ("full",):
        fn = net.fast_step._functions[name]  # noqa: SLF001
        args = (tf.constant(x["sparse"]),) if name == "lookup" else _traced_args(net, fn, x, y)
        hlo = fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
        kinds = _table_sized_instructions(hlo, "f32[1000000,4]")
        assert kinds and set(kinds) <= {"parameter", "scatter", "scatter-fusion"}, (name, kinds)
        if name != "lookup":
            assert "scatter-fusion" in kinds or "scatter" in kinds
            table_param = re.search(r"%(\S+) = f32\[1000000,4\]\S* parameter\((\d+)\)", hlo.split("ENTRY", 1)[1])
            aliased = re.findall(r"\{\d+\}: \((\d+), \{\}, (?:may|must)-alias\)", hlo.splitlines()[0])
            assert table_param and table_param.group(2) in aliased


def _table_sized_instructions(hlo: str, shape: str) -> list:
    """The kind of every HLO instruction that produces an array of ``shape``."""
    kinds = []
    for line in hlo.splitlines():
        match = re.match(rf"\s*(?:ROOT )?%(\S+) = {re.escape(shape)}\S* ([\w-]+)\(", line)
        if match:
            name, op = match.groups()
            kinds.append("scatter-fusion" if op == "fusion" and "scatter" in name else op)
    return kinds


def _traced_args(net, fn, x, y):
    """The arguments the fast step passed to ``fn`` (the compiled row update or full step), rebuilt."""
    from tfdlrm.models.batch import check_features

    dense, sparse = check_features({k: tf.constant(v) for k, v in x.items()}, net.config, "DLRM")
    if net.fast_step.mode == "full":
        return ({k: tf.constant(v) for k, v in x.items()}, dense, sparse, tf.constant(y), None)
    embedded, _ = net.fast_step._functions["lookup"](sparse)  # noqa: SLF001
    with tf.GradientTape() as tape:
        tape.watch(embedded)
        loss = tf.reduce_mean(net.logits_from_embeddings(dense, embedded))
    from tfdlrm.models.fast_step import row_arguments

    lr = tf.constant(0.1)
    return (*row_arguments(tape.gradient(loss, embedded), sparse, "sgd", lr), lr)


@pytest.mark.parametrize("optimizer, ids_per_lookup", [("sgd", 1), ("adagrad", 1), ("adagrad", 3), ("adam", 3)])
def test_fast_step_trains_like_the_stock_step(optimizer, ids_per_lookup):
    # 64 examples x 26 features over 300-row tables: most batches look some rows up
    # twice, so Adagrad's summing of duplicate ids is exercised too.
    config = get_preset("tiny", rows=300, ids_per_lookup=ids_per_lookup)
    batches = [batch(config, 64, seed=s) for s in range(2)]
    stock = built(config, optimizer, "off")
    stock_losses = fit_batches(stock, batches)
    for xla in ("sparse", "full") if optimizer != "adam" else ("sparse",):
        fast = built(config, optimizer, xla)
        assert fit_batches(fast, batches) == pytest.approx(stock_losses, abs=1e-5), xla
        # Adagrad divides by the root of tiny accumulators early on, which magnifies the
        # last-bit differences between XLA's and oneDNN's arithmetic (xla full).
        tolerance = 2e-4 if optimizer == "adagrad" else 2e-5
        for a, b in zip(stock.trainable_variables, fast.trainable_variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=tolerance, err_msg=f"{xla} {a.name}")
        if optimizer == "adagrad":
            for t_stock, t_fast in zip(stock.sparse_arch.tables, fast.sparse_arch.tables):
                np.testing.assert_allclose(stock.optimizer.get_slot(t_stock, "accumulator").numpy(),
                                           fast.optimizer.get_slot(t_fast, "accumulator").numpy(),
                                           rtol=1e-5 if xla == "sparse" else 1e-3, atol=1e-12)


def test_fast_step_matches_the_stock_step_across_an_epochs_short_last_batch():
    # An epoch's last batch is shorter (16,267 Criteo rows = 127 x 128 + 11): a new shape
    # for the compiled functions, and a mean over fewer rows.
    config = get_preset("tiny", rows=300)
    batches = [batch(config, n, seed=s) for s, n in enumerate((64, 11, 64))]
    stock = built(config, "sgd", "off")
    stock_losses = fit_batches(stock, batches)
    for xla, batch_size in (("sparse", None), ("full", None), ("sparse", 64)):
        fast = built(config, "sgd", xla)
        # with the batch the compiled parts are for (train sets it when an epoch has an odd batch),
        # the 11-row batch takes the lookup and the row update uncompiled: no XLA compilation for it
        fast.fast_step.batch_size = batch_size
        assert fit_batches(fast, batches) == pytest.approx(stock_losses, abs=1e-5), xla
        for a, b in zip(stock.trainable_variables, fast.trainable_variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5, err_msg=f"{xla} {a.name}")
        uncompiled = {name for name in fast.fast_step._functions if name.endswith(":plain")}  # noqa: SLF001
        assert uncompiled == ({"lookup:plain", "rows:plain"} if batch_size else set())


def test_dcn_uses_the_fast_step_too():
    config = get_preset("tiny", rows=200)
    batches = [batch(config, 32, seed=s) for s in range(2)]
    stock, fast = built(config, "sgd", "off", model="dcn"), built(config, "sgd", "sparse", model="dcn")
    assert fit_batches(fast, batches) == pytest.approx(fit_batches(stock, batches), abs=1e-5)
    assert fast.fast_step.compiled_functions and fast.cross_net._compiled  # noqa: SLF001 (the XLA cross network)


# -- compiled when asked -----------------------------------------------------------------------------------------------
def _xla_calls(concrete) -> list:
    """The functions marked for XLA compilation (``_XlaMustCompile``) that a traced graph calls,
    by their Python names."""
    names = []
    for op in concrete.graph.get_operations():
        try:
            if op.get_attr("_XlaMustCompile"):
                names.append(op.get_attr("f").name.split("_inference_")[-1].rsplit("_", 1)[0])
        except ValueError:
            pass
    return sorted(names)


@pytest.mark.parametrize("xla, compiled", [("sparse", {"lookup", "rows"}), ("full", {"full"}), ("off", set())])
def test_training_step_compiles_with_xla_when_asked(xla, compiled):
    config = get_preset("tiny", rows=100)
    net = built(config, "sgd", xla)
    x, y = batch(config, 16)
    net.train_on_batch(x, y)
    functions = net.fast_step._functions if net.fast_step else {}  # noqa: SLF001
    assert {name for name, fn in functions.items() if getattr(fn, "_jit_compile", False)} == compiled
    graph_calls = _xla_calls(net.train_function.get_concrete_function(
        iter(tf.data.Dataset.from_tensors((x, y)))))
    # the sparse step also compiles the dot interaction's triangle and its gradient (layers/interaction.py)
    interaction = ["spread", "take"] if xla == "sparse" else []
    assert graph_calls == sorted(list(compiled) + interaction)
    for name in compiled:
        fn = functions[name]
        assert fn.experimental_get_tracing_count() >= 1
        # XLA really compiles it: its HLO exists.
        args = _traced_args(net, fn, x, y) if name != "lookup" else (tf.constant(x["sparse"]),)
        assert "HloModule" in fn.experimental_get_compiler_ir(*args)(stage="hlo")


def test_keras_jit_compile_means_the_whole_step_compiled_with_ids_checked_first():
    config = get_preset("tiny", rows=100)
    tf.keras.utils.set_random_seed(5)
    net = build_model("dlrm", config)
    net.compile(optimizer=tf.keras.optimizers.legacy.SGD(0.1), loss="binary_crossentropy", jit_compile=True)
    assert net.fast_step.mode == "full"
    x, y = batch(config, 16)
    x["sparse"][3, 2] = 100
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature C3 .* got id 100"):
        net.train_on_batch(x, y)


# -- ids still checked -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xla, bad_id", [("sparse", 100), ("full", -1)])
def test_out_of_range_ids_raise_before_any_update_on_the_fast_path(xla, bad_id):
    config = get_preset("tiny", rows=100)
    net = built(config, "sgd", xla)
    x, y = batch(config, 16)
    net.train_on_batch(x, y)  # traced and compiled on good ids first
    weights = [v.numpy() for v in net.trainable_variables]
    step = int(net.optimizer.iterations.numpy())
    x, y = batch(config, 16, seed=1)
    x["sparse"][5, 7] = bad_id
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"feature C8 \(table 7\) has 100 rows, .* got id {bad_id}"):
        net.train_on_batch(x, y)
    assert int(net.optimizer.iterations.numpy()) == step
    for before, v in zip(weights, net.trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())


def test_out_of_range_id_in_a_bag_names_the_feature_on_the_fast_path():
    config = get_preset("tiny", rows=100, ids_per_lookup=3)
    net = built(config, "sgd", "sparse")
    x, y = batch(config, 8)
    x["sparse"][2, 4, 1] = 250
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature C5 .* got id 250"):
        net.train_on_batch(x, y)


def test_embedding_layer_inside_someone_elses_xla_cluster_skips_the_check_with_a_warning():
    from tfdlrm.layers.embedding import EmbeddingTables

    layer = EmbeddingTables([5, 5], 2, name="emb_xla")
    layer.build(tf.TensorShape([None, 2]))
    with pytest.warns(UserWarning, match="not range-checked inside an XLA cluster"):
        out = tf.function(layer, jit_compile=True)(tf.constant([[1, 4]], tf.int64))
    assert out.shape == (1, 2, 2)


# -- mixed precision ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["dlrm", "dcn"])
def test_bf16_keeps_variables_float32_and_stays_close_to_float32(model):
    config = get_preset("tiny", rows=500)
    batches = [batch(config, 256, seed=s) for s in range(2)]
    fp32 = built(config, "sgd", "sparse", model=model, lr=0.05)
    bf16 = built(config, "sgd", "sparse", model=model, mixed_precision="bf16", lr=0.05)
    assert all(v.dtype == tf.float32 for v in bf16.variables)
    for a, b in zip(fp32.variables, bf16.variables):  # same initial weights, same names
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert bf16.sparse_arch.compute_dtype == "float32"
    mlp = bf16.dense_arch if model == "dlrm" else bf16.deep_net
    assert mlp.dense_layers[0].compute_dtype == "bfloat16"
    x = batch(config, 256, seed=9)[0]
    p32, p16 = fp32(x).numpy(), bf16(x).numpy()
    assert bf16(x).dtype == tf.float32
    np.testing.assert_allclose(p16, p32, atol=0.02)
    losses32, losses16 = fit_batches(fp32, batches), fit_batches(bf16, batches)
    np.testing.assert_allclose(losses16, losses32, atol=0.02)
    tables = [np.abs(a.numpy() - b.numpy()).max() for a, b in zip(fp32.sparse_arch.tables, bf16.sparse_arch.tables)]
    assert max(tables) < 1e-3


def test_bf16_checkpoints_load_into_a_float32_model(tmp_path):
    config = get_preset("tiny", rows=50)
    bf16 = built(config, "sgd", "sparse", mixed_precision="bf16")
    fit_batches(bf16, [batch(config, 32)])
    bf16.save_weights(str(tmp_path / "ckpt"))
    fp32 = build_model("dlrm", config)
    fp32.load_weights(str(tmp_path / "ckpt"))
    for a, b in zip(bf16.variables, fp32.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_switch_resolution():
    assert resolve_xla("auto", None) == "sparse" and resolve_xla("auto", "hybrid") == "off"
    assert resolve_xla("full", "none") == "full"
    with pytest.raises(UserError, match="applies to one device"):
        resolve_xla("sparse", "mirrored")
    assert resolve_mixed_precision("off") is None and resolve_mixed_precision("bf16") == "bf16"
    assert resolve_mixed_precision("auto") == ("bf16" if native_bf16() else None)
    with pytest.raises(UserError, match="--xla full"):
        built(get_preset("tiny", rows=10), "adam", "full")


# -- the benchmark command ------------------------------------------------------------------------------------------------------
def test_bench_train_prints_figures_with_the_machine_as_json():
    proc = run_cli("bench", "train", "--preset", "tiny", "--rows", "2000", "--batch-size", "256", "--warmup", "2",
                   "--steps", "2", "--repeats", "2", "--distinct-batches", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["examples_per_second"] > 0 and len(result["runs_ms_per_step"]) == 2
    assert result["xla"] == "sparse" and result["peak_rss_bytes"] > 0
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["date"] and len(machine["load_average"]) == 3
    assert "examples/s" in proc.stderr and "load average" in proc.stderr
    # train's steps a call (batch 256: 10, dividing --log-every 100), warm-up and runs in whole calls
    assert result["steps_a_call"] == 10 and result["warmup_steps"] == 10 and result["steps_per_repeat"] == 10
    # the MLP-only floor, timed in the same process, with the tiny preset's widths
    floor = result["floor"]
    assert floor["bottom_mlp"] == "13-32-8" and floor["top_mlp"] == "359-32-1" and floor["ms_per_step"] > 0
    assert result["step_over_floor"] == pytest.approx(result["ms_per_step"] / floor["ms_per_step"], rel=0.02)
    assert "MLP-only floor, same process" in proc.stderr and result["threads"].startswith("threads: intra-op")
    # --huge-pages auto restarted the command with glibc's hugetlb tunable where that works
    from tfdlrm import _env

    assert result["huge_pages"]["active"] == (_env.huge_pages_environment() is not None or _env.huge_pages_active())


def test_bench_suite_table_lists_every_configuration():
    from tfdlrm.bench.train import SUITE, format_suite

    fake = {"examples_per_second": 70000, "ms_per_step": 29.3, "cpu_ms_per_step": 52.0, "peak_rss_bytes": 2**31,
            "machine": {"load_average": [0.5, 0.4, 0.3]}, "load_average_after": [0.6, 0.4, 0.3]}
    table = format_suite([{**fake, "label": label} for label, _ in SUITE] + [{"label": "broken", "error": "boom"}])
    assert table.count("\n") == len(SUITE) + 2 and "| 70,000 | 29.3 | 52.0 | 2.00 GiB | 0.50 / 0.60 |" in table
    assert "failed: boom" in table


def test_bench_train_from_tfrecord_data_reports_the_reader_too(tmp_path):
    proc = run_cli("bench", "train", "--preset", "tiny", "--data", "tfrecord", "--batch-size", "256", "--warmup", "2",
                   "--steps", "2", "--repeats", "1", "--xla", "off", "--mixed-precision", "off", "--json",
                   "--tmp-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["reader_rows_per_second"] > 0 and result["table_rows"] == 1_000_001
    assert result["xla"] == "off" and result["mixed_precision"] == "off"
    assert not list(tmp_path.iterdir())  # the temporary dataset is removed


def test_dump_rows_writes_the_rows_the_reader_yields(tmp_path):
    """The .npz the reference trains on (bench fit --reference): the training split in its stored
    order and the held-out split, exactly as tfdlrm's reader yields them, and the table sizes."""
    from tfdlrm.bench.reference import dump_rows
    from tfdlrm.pipelines.sources import open_data

    source = open_data("synthetic", get_preset("tiny", rows=300), train_examples=3072, eval_examples=2048)
    counts = dump_rows(source, str(tmp_path / "rows.npz"), batch_size=1024)
    data = np.load(tmp_path / "rows.npz")
    assert counts == {"train_rows": 3072, "held_out_rows": 2048, "table_rows": 300 * 26}
    x, y = next(iter(source.train_dataset(3072)))
    np.testing.assert_array_equal(data["tr_dense"], x["dense"].numpy())
    np.testing.assert_array_equal(data["tr_sparse"], x["sparse"].numpy())
    np.testing.assert_array_equal(data["tr_y"], y.numpy())
    x, y = next(iter(source.eval_dataset(2048)))
    np.testing.assert_array_equal(data["te_sparse"], x["sparse"].numpy())
    np.testing.assert_array_equal(data["te_y"], y.numpy())
    np.testing.assert_array_equal(data["rows"], [300] * 26)


def test_an_optimizer_that_clips_is_applied_by_tensorflow():
    """The compiled row updates do not clip: an optimizer with clipnorm, clipvalue or global_clipnorm
    takes TensorFlow's apply (which clips), not the compiled one."""
    from tfdlrm.models.fast_step import sparse_update_kind

    legacy = tf.keras.optimizers.legacy
    assert sparse_update_kind(legacy.SGD(0.1)) == "sgd" and sparse_update_kind(legacy.Adagrad(0.1)) == "adagrad"
    for clip in ({"clipnorm": 1.0}, {"clipvalue": 0.5}, {"global_clipnorm": 1.0}):
        assert sparse_update_kind(legacy.SGD(0.1, **clip)) is None, clip
        assert sparse_update_kind(legacy.Adagrad(0.1, **clip)) is None, clip
