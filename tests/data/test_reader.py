"""pipelines/reader.py and CriteoSource: batches, order, shuffling, resuming, sharding."""
import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

import tfdlrm
from tests.helpers.criteo_rows import (
    dataset_rows,
    numbered_lines,
    sorted_rows,
    write_lines,
)
from tfdlrm.errors import UserError
from tfdlrm.pipelines.convert import ConvertSpec, convert
from tfdlrm.pipelines.reader import CriteoDataset
from tfdlrm.pipelines.sources import CriteoSource, open_data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """1,000 training rows in 3 shards of 64-row blocks; 100 test rows. I1 = row number."""
    root = tmp_path_factory.mktemp("small")
    write_lines(root / "train.txt", numbered_lines(1000))
    write_lines(root / "test.txt", numbered_lines(100, start=1000))
    out = root / "ds"
    convert(ConvertSpec(out=str(out), train=[str(root / "train.txt")], test=[str(root / "test.txt")],
                        hash_buckets=97, rows_per_block=64, rows_per_shard=400))
    return out


def row_numbers(rows):
    return np.round(np.expm1(rows.view(np.float32)[:, 1].astype(np.float64))).astype(int)


def test_batches_have_the_contract_shapes_and_dtypes(small):
    source = open_data(str(small), tfdlrm.get_preset("tiny"))
    assert source.config.table_rows == (98,) * 26
    assert (source.train_examples, source.eval_examples) == (1000, 100)
    data = source.train_dataset(128, seed=1)
    assert data.cardinality().numpy() == 8
    x, y = next(iter(data))
    assert x["dense"].dtype == tf.float32 and x["dense"].shape == (128, 13)
    assert x["sparse"].dtype == tf.int64 and x["sparse"].shape == (128, 26)
    assert y.dtype == tf.float32 and y.shape == (128, 1)
    sizes = [int(b[1].shape[0]) for b in data]
    assert sizes == [128] * 7 + [104]


def test_eval_is_the_whole_held_out_split_in_file_order(small):
    source = open_data(str(small), tfdlrm.get_preset("tiny"))
    rows = dataset_rows(source.eval_dataset(30))
    assert row_numbers(rows).tolist() == list(range(1000, 1100))
    np.testing.assert_array_equal(rows, dataset_rows(source.eval_dataset(30)))


def test_training_order_is_seeded_reshuffled_each_epoch_and_complete(small):
    dataset = CriteoDataset(small)
    in_order = dataset_rows(dataset.dataset("train", 100))
    assert row_numbers(in_order).tolist() == list(range(1000))
    a = dataset.dataset("train", 100, seed=5)
    first, second = dataset_rows(a), dataset_rows(a)  # two epochs of one dataset
    again = dataset_rows(dataset.dataset("train", 100, seed=5))
    other = dataset_rows(dataset.dataset("train", 100, seed=6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second) and not np.array_equal(first, other)
    for rows in (first, second, other):
        np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(in_order))
    assert not np.array_equal(first, in_order)
    # rows from different shards meet in one batch
    shard_of = row_numbers(first[:100]) // 448
    assert len(set(shard_of.tolist())) > 1


def test_start_batch_resumes_where_an_epoch_left_off(small):
    dataset = CriteoDataset(small)
    full = dataset_rows(dataset.dataset("train", 64, seed=2))
    resumed = dataset.dataset("train", 64, seed=2, start_batch=5)
    assert resumed.cardinality().numpy() == 16 - 5
    np.testing.assert_array_equal(dataset_rows(resumed), full[5 * 64:])
    with pytest.raises(UserError, match="start batch 17"):
        dataset.dataset("train", 64, start_batch=17)


@pytest.mark.parametrize("pipelines, seed", [(2, None), (3, 4)])
def test_input_context_gives_each_worker_a_disjoint_share(small, pipelines, seed):
    dataset = CriteoDataset(small)
    parts = []
    for i in range(pipelines):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=i,
                                             num_replicas_in_sync=pipelines)
        data = dataset.dataset("train", 50, seed=seed, input_context=context)
        rows = dataset_rows(data)
        assert data.cardinality().numpy() == -(-len(rows) // 50)
        parts.append(row_numbers(rows))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= 64
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    if seed is None:  # blocks are dealt round-robin in file order
        assert parts[0][:64].tolist() == list(range(64)) and parts[1][:64].tolist() == list(range(64, 128))


def test_describe_names_the_dataset(small):
    source = open_data(str(small / "manifest.json"), tfdlrm.get_preset("kaggle"))  # the manifest names it too
    info = source.describe()
    manifest = (small / "manifest.json").read_bytes()
    assert info["kind"] == "criteo" and info["path"] == str(small.resolve())
    assert info["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert info["mapping"]["categorical"] == "hash" and info["table_rows"] == [98] * 26
    json.dumps(info)


def test_a_model_trains_on_a_converted_dataset(small):
    source = open_data(str(small), tfdlrm.get_preset("tiny"))
    model = tfdlrm.build_model("dlrm", source.config)
    tfdlrm.compile_model(model, "adagrad", 0.05, metrics=False)
    history = model.fit(source.train_dataset(100, seed=1), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert 0.0 <= tfdlrm.evaluate(model, source.eval_dataset(64)).auc <= 1.0


def test_raw_files_through_the_python_api(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(70))
    write_lines(tmp_path / "heldout.txt", numbered_lines(10, start=70))
    config = tfdlrm.get_preset("tiny")
    source = tfdlrm.open_data(str(tmp_path / "train.txt"), config, eval_data=str(tmp_path / "heldout.txt"),
                              cache_dir=str(tmp_path / "cache"), hash_buckets=5)
    assert isinstance(source, CriteoSource) and source.config.table_rows == (6,) * 26
    assert (source.train_examples, source.eval_examples) == (70, 10)
    assert str(tmp_path / "cache") in source.describe()["path"]
    days = tfdlrm.open_data(str(tmp_path / "train.txt"), config, cache_dir=str(tmp_path / "cache"))
    assert (days.train_examples, days.eval_examples) == (60, 10)


def test_open_data_errors(small, tmp_path):
    config = tfdlrm.get_preset("tiny")
    with pytest.raises(UserError, match="--eval-data applies to raw TSV files"):
        open_data(str(small), config, eval_data="x.txt")
    with pytest.raises(UserError, match="--hash-buckets applies to raw Criteo TSV files"):
        open_data(str(small), config, hash_buckets=10)
    with pytest.raises(UserError, match="--cache-dir applies"):
        open_data("synthetic", config, cache_dir="x")
    with pytest.raises(UserError, match="not a converted Criteo dataset"):
        open_data(str(tmp_path), config)
    with pytest.raises(UserError, match="no such file or directory"):
        open_data(str(tmp_path / "nope"), config)
    with pytest.raises(UserError, match="13 dense features"):
        open_data(str(small), tfdlrm.get_preset("paper-benchmark"))
    with pytest.raises(UserError, match="one id \\(or a bag of ids\\) per feature"):
        open_data(str(small), config.replace(ids_per_lookup=3))


def test_damaged_datasets_are_refused(small, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    with open(copy / "train-00001.tfrecord", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="damaged: train-00001.tfrecord has"):
        CriteoDataset(copy)
    (copy / "train-00001.tfrecord").unlink()
    with pytest.raises(UserError, match="train-00001.tfrecord .* is missing"):
        CriteoDataset(copy)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version 99"):
        CriteoDataset(copy)
