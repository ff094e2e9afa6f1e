"""Your own features (pipelines/spec.py, pipelines/tabular.py): the feature spec, the
conversion of CSV/TSV files with a header checked row by row against a plain-Python
computation of the ids, bad rows, and the reader's batches (ragged bags)."""
import json
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main
from tests.helpers.tables import SPEC, make_rows, write_table
from tfdlrm.errors import UserError
from tfdlrm.pipelines.reader import CriteoDataset
from tfdlrm.pipelines.spec import FeatureSpec
from tfdlrm.pipelines.tabular import TabularSpec, convert_tabular


def expected_ids(train_rows, rows, width=2):
    """Plain Python: vocabulary of the training rows (count desc, then value), 0 missing,
    1 unseen; hashing by TensorFlow's fingerprint op (the definition); bags padded with -1."""
    def vocab(values):
        counts = Counter(v for v in values if v)
        return {v: i + 2 for i, v in enumerate(sorted(counts, key=lambda v: (-counts[v], v)))}

    region = vocab(r["region"] for r in train_rows)
    labels = vocab(t for r in train_rows for t in r["labels"].split(";") if t)
    shop = [r["shop"] for r in rows]
    shop_ids = 1 + tf.strings.to_hash_bucket_fast(shop, 50).numpy() if rows else []
    out = []
    for r, s in zip(rows, shop_ids):
        bag = [labels.get(t, 1) for t in r["labels"].split(";") if t][:width]
        out.append([0 if not r["region"] else region.get(r["region"], 1), int(s)] + bag + [-1] * (width - len(bag)))
    return np.array(out, np.int64)


def expected_dense(rows):
    age = np.array([np.nan if r["age"] == "" else float(r["age"]) for r in rows], np.float32)
    age = np.log1p(np.maximum(np.nan_to_num(age.astype(np.float64), nan=0.0), 0)).astype(np.float32)
    price = np.array([float(r["price"]) for r in rows], np.float32)
    return np.stack([age, price], axis=1)


def dataset_arrays(path, split):
    data = CriteoDataset(path)
    dense, sparse, label = [], [], []
    for features, y in data.dataset(split, 64):
        dense.append(features["dense"].numpy())
        sparse.append(features["sparse"].to_tensor(-1).numpy())
        label.append(y.numpy()[:, 0])
    return np.concatenate(dense), np.concatenate(sparse), np.concatenate(label)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabular")
    (root / "spec.yaml").write_text(SPEC)
    train_rows, test_rows = make_rows(900, 1), make_rows(300, 2)
    write_table(root / "train.csv.gz", train_rows)
    write_table(root / "test.tsv", test_rows, delimiter="\t")
    result = convert_tabular(TabularSpec(out=str(root / "ds"), features=str(root / "spec.yaml"),
                                         train=[str(root / "train.csv.gz")], test=[str(root / "test.tsv")],
                                         rows_per_block=128, val_fraction=0.25), log=lambda s: None)
    return {"root": root, "train": train_rows, "test": test_rows, "result": result, "path": root / "ds"}


def test_rows_and_ids_match_plain_python(converted):
    train_part, val_part = converted["train"][:675], converted["train"][675:]
    manifest = converted["result"].manifest
    for split, rows in (("train", train_part), ("val", val_part), ("test", converted["test"])):
        dense, sparse, label = dataset_arrays(converted["path"], split)
        np.testing.assert_array_equal(label, [float(r["bought"]) for r in rows])
        np.testing.assert_array_equal(dense, expected_dense(rows))
        np.testing.assert_array_equal(_flat(sparse), expected_ids(train_part, rows))
        cut = sum(len([t for t in r["labels"].split(";") if t]) > 2 for r in rows)
        assert manifest["splits"][split]["truncated_bags"] == ({"labels": cut} if cut else {})
    region_vocab = (converted["path"] / "vocabulary" / "region.txt").read_text().split("\n")[:-1]
    assert set(region_vocab) == {"north", "south", "east", "west"}
    assert manifest["table_sizes"] == [6, 51, 6]
    assert manifest["sources"][0]["ignored_columns"] == ["junk"]


def _flat(sparse):
    """[n, 3, w] padded -> [n, 1 + 1 + 2] as the expected layout (single, single, bag of 2)."""
    return np.concatenate([sparse[:, 0, :1], sparse[:, 1, :1], sparse[:, 2, :2]], axis=1)


def test_batches_are_ragged_bags(converted):
    data = CriteoDataset(converted["path"])
    features, label = next(iter(data.dataset("test", 16)))
    sparse = features["sparse"]
    assert isinstance(sparse, tf.RaggedTensor) and sparse.shape[:2].as_list() == [16, 3]
    lengths = sparse.row_lengths(axis=2).numpy().reshape(16, 3)
    assert (lengths[:, :2] == 1).all() and (lengths[:, 2] <= 2).all()
    assert features["dense"].shape == (16, 2) and label.shape == (16, 1)


def test_bad_rows_skip_counts_and_error_policy(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(FeatureSpec.from_dict(
        {"label": "bought", "dense": ["age"], "categorical": ["region"]}).to_dict()))
    rows = make_rows(50, 3)
    bad = ["1,2,3\n", "\n", "4.5,maybe,j,3,north,red,s1\n", "4.5,1,j,old,north,red,s1\n"]
    write_table(tmp_path / "train.csv", rows, extra_lines=bad)
    write_table(tmp_path / "test.csv", rows[:10])
    spec = TabularSpec(out=str(tmp_path / "ds"), features=str(tmp_path / "spec.json"),
                       train=[str(tmp_path / "train.csv")], test=[str(tmp_path / "test.csv")], on_bad_row="skip")
    result = convert_tabular(spec, log=lambda s: None)
    train = result.manifest["splits"]["train"]
    assert (train["rows_read"], train["rows_written"], train["rows_rejected"]) == (54, 50, 4)
    assert train["rejected_by_kind"] == {"blank_line": 1, "field_count": 1, "label": 1, "dense": 1,
                                         "categorical": 0}
    assert [e["line"] for e in result.manifest["bad_rows"]["examples"]] == [52, 53, 54, 55]
    spec.on_bad_row, spec.out = "error", str(tmp_path / "ds2")
    with pytest.raises(UserError, match=r"train.csv line 52: 3 fields, the header has 7"):
        convert_tabular(spec, log=lambda s: None)
    assert not (tmp_path / "ds2").exists()


@pytest.mark.parametrize("text, message", [
    ("label: y\ndense: [a]\ncategorical: [b]\ncolour: red\n", "unknown key(s) colour"),
    ("label: y\ndense: []\ncategorical: [b]\n", "no dense columns"),
    ("label: y\ndense: [a]\ncategorical: [{name: b, hash_buckets: 5, min_frequency: 2}]\n", "not both"),
    ("label: y\ndense: [a]\ncategorical: [{name: b, max_ids: 3}]\n", "max_ids applies to multi-hot"),
    ("label: y\ndense: [a b]\ncategorical: [b]\n", "column names must be letters"),
    ("label: y\ndense: [a]\ncategorical: [a]\n", "names column 'a' twice"),
    ("label: y\ndense: [{name: a, transform: sqrt}]\ncategorical: [b]\n", "transform must be one of"),
    ("label: [y\n", "not valid YAML"),
])
def test_spec_errors(tmp_path, text, message):
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FeatureSpec.load(str(tmp_path / "spec.yaml"))


def test_spec_yaml_and_json_agree(tmp_path):
    (tmp_path / "a.yaml").write_text(SPEC)
    spec = FeatureSpec.load(str(tmp_path / "a.yaml"))
    (tmp_path / "b.json").write_text(json.dumps(spec.to_dict()))
    assert FeatureSpec.load(str(tmp_path / "b.json")) == spec
    assert spec.columns == ("bought", "age", "price", "region", "shop", "labels")
    assert [c.kind for c in spec.categorical] == ["vocabulary", "hash", "vocabulary"]


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    write_table(tmp_path / "train.csv", make_rows(5, 4))
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    proc = run_main(["convert", "--features", str(tmp_path / "spec.yaml"), "--train", str(tmp_path / "other.csv"),
                     "--out", str(tmp_path / "ds")])
    assert_clean_error(proc, "other.csv has no column(s) bought, age, price, region, shop, labels")
    proc = run_main(["convert", "--features", str(tmp_path / "spec.yaml"), "--train", str(tmp_path / "train.csv"),
                     "--hash-buckets", "10", "--out", str(tmp_path / "ds")])
    assert_clean_error(proc, "--hash-buckets applies to Criteo files")
