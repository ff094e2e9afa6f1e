"""Non-finite dense values in serving requests (docs/serving.md, "Raw values" and "Bad requests").

The ``ids`` signature takes transformed dense features, which are never NaN or infinite: such a
value fails the request with ``InvalidArgument`` and a ``tfdlrm:`` message naming where it is.
The raw signatures (``serving_default``, ``examples``) take raw counts, where NaN, +-inf and
negative counts mean missing, as in training: those requests still score, exactly as the row
with the value missing, computed here independently (log1p written out, hashed ids by hand).
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.criteo_rows import hash_ids, numbered_lines, write_lines

BUCKETS = 100
TOLERANCE = 1e-6
NAN, INF = float("nan"), float("inf")
DENSE = [5, 0, 1, 250, 3, 17, 99999, 2, 1, 0, 7, 12, 40]
CATEGORICAL = ["%08x" % (0x1234 + 977 * i) for i in range(25)] + [""]
FINITE_MESSAGE = "tfdlrm: input dense must be finite"


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    """A tiny DLRM over a hashed Criteo dataset (100 buckets) and its signature functions."""
    from tfdlrm.pipelines.convert import ConvertSpec, convert
    from tfdlrm.pipelines.lookup import RawFeatures
    from tfdlrm.presets import get_preset
    from tfdlrm.serving.signatures import ON_INVALID, signature_functions
    from tfdlrm.training.compile import build_model

    root = tmp_path_factory.mktemp("nonfinite")
    convert(ConvertSpec(out=str(root / "ds"), train=[str(write_lines(root / "train.txt", numbered_lines(60)))],
                        test=[str(write_lines(root / "test.txt", numbered_lines(20, start=60)))],
                        rows_per_block=16, hash_buckets=BUCKETS, progress=False), log=lambda s: None)
    tf.keras.utils.set_random_seed(3)
    model = build_model("dlrm", get_preset("tiny", rows=BUCKETS + 1))
    features = RawFeatures.from_dataset(str(root / "ds"), on_invalid=ON_INVALID)
    return {"model": model, "functions": signature_functions(model, features)}


def expected_probability(model, rows) -> np.ndarray:
    """The model on ``rows`` (raw dense, raw hex) mapped by hand: log1p(max(count, 0)) with
    NaN, +-inf (and negatives, through the max) as the missing 0; id 1 + value mod 100, "" -> 0."""
    ids = hash_ids(BUCKETS)
    dense = np.array([[math.log1p(max(x, 0.0)) if math.isfinite(x) else 0.0 for x in d] for d, _ in rows], np.float32)
    sparse = np.array([[ids(j, text) for j, text in enumerate(c)] for _, c in rows], np.int64)
    return tf.sigmoid(model.logits({"dense": dense, "sparse": sparse})).numpy()


def raw_inputs(rows) -> dict:
    return {"dense": tf.constant([d for d, _ in rows], tf.float32),
            "categorical": tf.constant([c for _, c in rows], tf.string)}


def with_first(value) -> tuple:
    return [float(value)] + [float(x) for x in DENSE[1:]], CATEGORICAL


def test_ids_takes_finite_transformed_values(criteo):
    model, ids = criteo["model"], criteo["functions"]["ids"]
    dense = np.log1p(np.array([DENSE, DENSE[::-1]], np.float32))
    sparse = np.arange(52, dtype=np.int64).reshape(2, 26)
    got = ids(dense=tf.constant(dense), sparse=tf.constant(sparse))["probability"].numpy()
    want = tf.sigmoid(model.logits({"dense": dense, "sparse": sparse})).numpy()
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    empty = ids(dense=tf.zeros([0, 13]), sparse=tf.zeros([0, 26], tf.int64))["probability"]
    assert empty.shape == (0, 1)


@pytest.mark.parametrize("value, row, column", [(NAN, 1, 0), (INF, 0, 12), (-INF, 2, 5)])
def test_ids_refuses_nan_and_infinite_dense_values(criteo, value, row, column):
    dense = np.log1p(np.tile(np.array(DENSE, np.float32), (3, 1)))
    dense[row, column] = value
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        criteo["functions"]["ids"](dense=tf.constant(dense), sparse=tf.ones([3, 26], tf.int64))
    message = str(error.value)
    assert FINITE_MESSAGE in message, message
    assert f"got] [{value}] [at [row, column]] [{row} {column}]" in message, message  # [nan], [inf], [-inf]


def test_serving_default_maps_nan_infinite_and_negative_counts_to_missing(criteo):
    model, serve = criteo["model"], criteo["functions"]["serving_default"]
    rows = [with_first(v) for v in (DENSE[0], NAN, INF, -INF, -7, 0)]
    got = serve(**raw_inputs(rows))["probability"].numpy()
    np.testing.assert_allclose(got, expected_probability(model, rows), atol=TOLERANCE, rtol=0)
    assert got[0] != got[1], "the count of I1 must matter, or this test shows nothing"
    assert got[1] == got[2] == got[3] == got[4] == got[5]  # missing, as a count of 0


def _example(first) -> bytes:
    """A raw tf.Example with I1 = ``first`` (None: absent) and the other values of the row."""
    example = tf.train.Example()
    for i, x in enumerate([first] + DENSE[1:]):
        if x is not None:
            example.features.feature[f"I{i + 1}"].float_list.value.append(float(x))
    for i, text in enumerate(CATEGORICAL):
        example.features.feature[f"C{i + 1}"].bytes_list.value.append(text.encode())
    return example.SerializeToString()


def test_examples_keep_the_documented_missing_values(criteo):
    """The tf.Example schema (pipelines/lookup.py): an I feature holds a raw count, NaN or
    absent is missing, +-inf too; the request scores as serving_default does."""
    model, examples = criteo["model"], criteo["functions"]["examples"]
    firsts = [DENSE[0], None, NAN, INF, -INF]
    got = examples(examples=tf.constant([_example(v) for v in firsts]))["probability"].numpy()
    want = expected_probability(model, [with_first(NAN if v is None else v) for v in firsts])
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    assert got[0] != got[1] and got[1] == got[2] == got[3] == got[4]


def test_a_saved_model_of_generated_data_refuses_them_in_both_its_signatures(tmp_path):
    """A run on generated data exports ids only (serving_default is ids): the check is in the
    saved graph, where TF Serving runs it."""
    from tfdlrm.presets import get_preset
    from tfdlrm.serving.export import write_saved_model
    from tfdlrm.training.compile import build_model

    model = build_model("dlrm", get_preset("tiny", rows=50))
    write_saved_model(tmp_path / "1", model, "dlrm")
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    dense = np.full((2, 13), 0.5, np.float32)
    sparse = tf.ones([2, 26], tf.int64)
    want = model.predict_on_batch({"dense": dense, "sparse": sparse})
    for name in ("ids", "serving_default"):
        got = loaded.signatures[name](dense=tf.constant(dense), sparse=sparse)["probability"].numpy()
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
        bad = dense.copy()
        bad[1, 3] = NAN
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"input dense must be finite.*\[1 3\]"):
            loaded.signatures[name](dense=tf.constant(bad), sparse=sparse)


def test_your_own_features_ids_refuses_them_and_raw_columns_map_them_to_missing(tmp_path):
    from tests.helpers.tables import SPEC, make_rows, write_table
    from tfdlrm.pipelines.manifest import read_manifest
    from tfdlrm.pipelines.sources import CriteoSource
    from tfdlrm.pipelines.spec import TabularFeatures
    from tfdlrm.pipelines.tabular import TabularSpec, convert_tabular
    from tfdlrm.presets import get_preset
    from tfdlrm.serving.signatures import signature_functions
    from tfdlrm.training.compile import build_model

    (tmp_path / "spec.yaml").write_text(SPEC)
    convert_tabular(TabularSpec(out=str(tmp_path / "ds"), features=str(tmp_path / "spec.yaml"),
                                train=[str(write_table(tmp_path / "train.csv", make_rows(100, 1)))],
                                test=[str(write_table(tmp_path / "test.csv", make_rows(20, 2)))]), log=lambda s: None)
    manifest, _ = read_manifest(tmp_path / "ds", check_files=False)
    model = build_model("dlrm", CriteoSource(tmp_path / "ds", get_preset("tiny")).config)
    functions = signature_functions(model, TabularFeatures(manifest["features"], str(tmp_path / "ds")))
    # age is log1p, price is taken as it is ("none"): missing (NaN, +-inf) is 0 for both
    columns = {"age": [30.0, NAN, INF, 0.0], "price": [-2.5, -INF, NAN, 0.0],
               "region": ["north"] * 4, "shop": ["s3"] * 4, "labels": ["red;blue"] * 4}
    raw = {k: tf.constant(v, tf.float32 if k in ("age", "price") else tf.string) for k, v in columns.items()}
    got = functions["serving_default"](**raw)["probability"].numpy()
    assert np.isfinite(got).all() and got[1] == got[2] == got[3] != got[0]
    transformed = functions["transform"](**raw)
    np.testing.assert_array_equal(transformed["dense"].numpy()[1:], 0.0)
    dense = transformed["dense"].numpy()
    dense[2, 1] = INF
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input dense must be finite.*\[2 1\]"):
        functions["ids"](dense=tf.constant(dense), sparse=transformed["sparse"])
