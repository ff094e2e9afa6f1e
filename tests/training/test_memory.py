"""The memory estimate and its check (tfdlrm/training/memory.py, docs/training.md "Memory"):
the parts against counts made here (Keras's own parameter count, the bytes written out), the
refusal before any variable exists (train, compare, a manifest with huge tables), --memory-limit,
and out-of-memory errors turned into one line."""
import json
import shutil

import pytest
import tensorflow as tf

from tests.helpers.cli import run_main
from tests.helpers.criteo_rows import numbered_lines, write_lines
from tfdlrm.errors import UserError
from tfdlrm.presets import get_preset
from tfdlrm.training import memory
from tfdlrm.training.spec import TrainSpec

GiB = 1 << 30
KAGGLE_1M = 26 * 1_000_000 * 16 * 4  # bytes of the kaggle preset's tables at --rows 1000000


def _dense_bytes(model_name, config):
    """Keras's count of the built model, less the tables: the dense weights' bytes."""
    from tfdlrm.training.compile import build_model

    model = build_model(model_name, config)
    return (model.count_params() - sum(config.table_rows) * config.embedding_dim) * 4


@pytest.mark.parametrize("optimizer, table_slots, adam", [("sgd", 0, 0), ("adagrad", 1, 0), ("adam", 2, 2)])
def test_parts_of_the_estimate(optimizer, table_slots, adam):
    config = get_preset("kaggle", rows=1_000_000)
    small = get_preset("kaggle", rows=10)  # the same dense layers, built quickly
    dense = _dense_bytes("dlrm", small)
    e = memory.estimate_training_memory("dlrm", config, optimizer, batch_size=2048, eval_batch_size=4096,
                                        eval_rows=1000, baseline=GiB)
    assert e.tables == int(KAGGLE_1M * 1.125)
    assert e.slots == table_slots * KAGGLE_1M
    assert e.dense == dense * (1 + table_slots)
    assert e.step == adam * KAGGLE_1M
    # DLRM's per-example floats: 13 dense in, 512+256+64+16 bottom, 26x16 looked up, the 27x27 Gram matrix,
    # 16 + 351 out of the interaction, 512+256+1 top; 3x a training batch of 2048 is above one eval batch
    width = 13 + (512 + 256 + 64 + 16) + 26 * 16 + 27 * 27 + (16 + 351) + (512 + 256 + 1)
    assert e.activations == 3 * 2048 * width * 4 + 1000 * 80
    assert e.runtime == GiB + (400 << 20)
    assert e.total == e.tables + e.slots + e.dense + e.step + e.activations + e.runtime


def test_embedding_optimizer_mirrored_and_hybrid():
    config = get_preset("tiny", rows=1000)
    tables = 26 * 1000 * 8 * 4
    dense = _dense_bytes("dcn", config)
    e = memory.estimate_training_memory("dcn", config, "sgd", embedding_optimizer="adagrad")
    assert (e.slots, e.dense, e.step) == (tables, dense, 0)  # the tables' accumulators, no dense slots
    e = memory.estimate_training_memory("dlrm", config, "adagrad", parallel="mirrored", devices=4)
    assert e.tables == int(tables * (1.125 + 3)) and e.slots == 4 * tables
    assert e.step == 5 * tables  # four replicas' densified table gradients and their sum
    rows = config.with_rows([5000] + [10] * 25)
    e = memory.estimate_training_memory("dlrm", rows, "sgd", parallel="hybrid", devices=2)
    assert e.step == 5000 * 8 * 4  # the largest table, created whole before it is split
    with pytest.raises(UserError, match="unknown optimizer 'rmsprop'"):
        memory.estimate_training_memory("dlrm", config, "rmsprop")


def test_bags_count_every_looked_up_row():
    config = get_preset("paper-benchmark")  # 8 tables, dim 64, 100 ids per lookup
    one_hot = config.replace(ids_per_lookup=1)
    assert memory.activation_width("dlrm", config) - memory.activation_width("dlrm", one_hot) == 8 * 100 * 64


def test_format_bytes():
    assert [memory.format_bytes(n) for n in (512, 3 << 20, int(2.5 * GiB), 5 << 40)] == [
        "512 B", "3.0 MiB", "2.5 GiB", "5.0 TiB"]


def test_the_check_refuses_over_the_limit_and_passes_under_it():
    config = get_preset("kaggle", rows=1_000_000)
    spec = TrainSpec(preset="kaggle", rows=1_000_000, optimizer="adagrad", memory_limit="2G")
    with pytest.raises(UserError) as error:
        memory.check_training_memory(spec, config)
    text = str(error.value)
    assert "training dlrm (adagrad) needs an estimated" in text and "more than --memory-limit 2.0 GiB" in text
    assert "embedding tables 1.7 GiB" in text and "optimizer slots 1.5 GiB" in text
    assert "--rows" in text and "sgd (no optimizer slots)" in text and "\n" not in text
    spec.memory_limit = 64 * GiB
    assert memory.check_training_memory(spec, config).total < 64 * GiB
    # without a limit: MemAvailable plus what this process holds
    spec.memory_limit = None
    held = memory.process_rss()
    with pytest.raises(UserError, match=r"MemAvailable 100\.0 MiB .*--memory-limit SIZE to override"):
        memory.check_training_memory(spec, config, available=100 << 20)
    assert memory.check_training_memory(spec, config, available=64 * GiB - held) is not None
    spec.parallel = "ps"  # the variables live on the parameter servers
    assert memory.check_training_memory(spec, config, available=0) is None


@pytest.mark.parametrize("value", ["8X", "-1", "zero", True])
def test_a_bad_memory_limit_is_refused(value):
    with pytest.raises(UserError, match="--memory-limit"):
        TrainSpec(memory_limit=value).check()


def test_the_limit_is_no_setting_of_the_run():
    assert "memory_limit" not in TrainSpec(memory_limit="8G").to_dict()
    assert memory.parse_memory_limit("8G") == 8 * GiB and memory.parse_memory_limit("512MB") == 512 * 10 ** 6


def test_train_refuses_before_building_anything(monkeypatch):
    import tfdlrm.training.loop as loop

    def build_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "build_model", build_model)
    with pytest.raises(UserError, match=r"more than --memory-limit 1\.0 MiB"):
        loop.train(TrainSpec(memory_limit="1M", train_examples=2048, eval_examples=1024), log=lambda s: None)


def test_train_with_two_billion_rows_is_one_line():
    proc = run_main(["train", "--preset", "kaggle", "--rows", "2000000000", "--data", "random"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training dlrm (sgd) needs an estimated 3.4 TiB"), lines
    assert "embedding tables 3.4 TiB" in lines[0] and "MemAvailable" in lines[0]


def test_train_and_compare_take_memory_limit(tmp_path):
    proc = run_main(["train", "--train-examples", "2048", "--eval-examples", "1024", "--memory-limit", "100MiB"])
    assert proc.returncode == 2 and "more than --memory-limit 100.0 MiB" in proc.stderr, proc.stderr
    proc = run_main(["compare", "--models", "dlrm,dcn", "--optimizers", "sgd,adam", "--train-examples", "2048",
                     "--eval-examples", "1024", "--memory-limit", "100MiB", "--out", str(tmp_path / "cmp")])
    assert proc.returncode == 2, proc.stderr
    assert "training dcn (adam) needs" in proc.stderr  # the largest of the four, before any trains
    assert not (tmp_path / "cmp" / "runs").exists()
    proc = run_main(["train", "--memory-limit", "lots"])
    assert proc.returncode == 2 and "--memory-limit" in proc.stderr and "expected bytes" in proc.stderr


def test_a_manifest_with_a_huge_table_is_refused(tmp_path):
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    convert(ConvertSpec(out=str(tmp_path / "ds"), train=[str(write_lines(tmp_path / "t.txt", numbered_lines(40)))],
                        test=[str(write_lines(tmp_path / "e.txt", numbered_lines(20, start=40)))],
                        rows_per_block=16, hash_buckets=100, progress=False), log=lambda s: None)
    shutil.copytree(tmp_path / "ds", tmp_path / "huge")
    manifest = json.loads((tmp_path / "huge" / "manifest.json").read_text())
    manifest["table_sizes"][0] = 10 ** 12
    (tmp_path / "huge" / "manifest.json").write_text(json.dumps(manifest))
    proc = run_main(["train", "--data", str(tmp_path / "huge")])
    assert proc.returncode == 2 and "embedding tables 32.7 TiB" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


OOM = ("Exception encountered when calling layer 'dlrm' (type DLRM).\n\n{{function_node "
       "__wrapped__StatelessRandomUniformV2_device_/job:localhost/replica:0/task:0/device:CPU:0}} OOM when "
       "allocating tensor with shape[1000000000000,8] and type float on /job:localhost/replica:0/task:0/device:CPU:0 "
       "by allocator mklcpu [Op:StatelessRandomUniformV2] name: \n\nCall arguments received by layer 'dlrm'")


@pytest.mark.parametrize("error", [tf.errors.ResourceExhaustedError(None, None, OOM),
                                   MemoryError("Unable to allocate 29.1 TiB for an array with shape (10, 8)")])
def test_out_of_memory_anywhere_is_one_line(monkeypatch, error):
    import tfdlrm.training.loop as loop

    def build_model(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "build_model", build_model)
    proc = run_main(["train", "--train-examples", "2048", "--eval-examples", "1024", "--memory-limit", "64G"])
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    what = ("Unable to allocate 29.1 TiB" if isinstance(error, MemoryError)
            else "cannot allocate a float tensor of shape [1000000000000,8]")
    assert line.startswith(f"error: out of memory: {what}"), line
    assert "the run's estimated peak:" in line and "--rows" in line and "--batch-size" in line


def test_export_out_of_memory_names_no_training_flags():
    from tfdlrm.cli.main import out_of_memory_message

    text = out_of_memory_message(tf.errors.ResourceExhaustedError(None, None, OOM), "export")
    assert text.startswith("out of memory: cannot allocate a float tensor") and "more memory" in text
    assert "--rows" not in text
    assert out_of_memory_message(ValueError("OOM when allocating"), "train") is None
