"""pipelines/features.py: the one definition of the raw -> model mapping, in TensorFlow,
and the numpy twins the converter uses, proven equal on every real row."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.criteo_rows import REAL_FILES, python_fields
from tfdlrm.errors import UserError
from tfdlrm.pipelines.convert import ConvertSpec, convert
from tfdlrm.pipelines.features import dense_transform, dense_transform_np, parse_hex
from tfdlrm.pipelines.lookup import CategoricalLookup, RawFeatures
from tfdlrm.pipelines.tsv import parse_chunk
from tfdlrm.pipelines.vocabulary import CategoricalMapping, hex_lines, parse_hex_lines


def test_dense_transform_by_hand():
    x = np.array([[np.nan, -5, 0, 1, 1e6, 2**24 + 1]], np.float32)
    want = [0.0, 0.0, 0.0, math.log(2), math.log1p(1e6), math.log1p(2**24)]  # 2**24 + 1 is 2**24 in float32
    np.testing.assert_allclose(dense_transform_np(x)[0], want, rtol=1e-7)
    np.testing.assert_array_equal(dense_transform(x).numpy(), dense_transform_np(x))


def test_dense_twin_is_bitwise_equal_to_tensorflow_over_a_wide_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(-10, 1 << 20), rng.integers(0, 2**31, 200_000), [np.nan, np.inf]]).astype(np.float32)
    x = x[rng.permutation(len(x))]  # positions in vector lanes vary
    got_tf = dense_transform(x.reshape(-1, 1)).numpy().ravel()
    np.testing.assert_array_equal(got_tf.view(np.int32), dense_transform_np(x).view(np.int32))


def test_parse_hex_in_tensorflow():
    values, missing, valid = parse_hex(tf.constant(["68fd1e64", "ABCDEF01", "", "0000000g", "1234567", "123456789",
                                                    "12 45678", "ffffffff"]))
    assert values.numpy().tolist()[:2] == [0x68FD1E64, 0xABCDEF01]
    assert values.numpy()[-1] == 0xFFFFFFFF
    assert missing.numpy().tolist() == [False, False, True, False, False, False, False, False]
    assert valid.numpy().tolist() == [True, True, True, False, False, False, False, True]


def test_hash_ids_by_hand_in_numpy_and_tensorflow():
    mapping = CategoricalMapping.hashing(10)
    assert mapping.table_sizes() == (11,) * 26
    texts = ["0000000a", "00000013", "", "FFFFFFFF"] + ["00000000"] * 22
    values = np.array([[int(t, 16) if t else 0 for t in texts]], np.uint32)
    missing = np.array([[t == "" for t in texts]])
    ids = mapping.ids_np(values, missing)
    assert ids[0, :4].tolist() == [1 + 10 % 10, 1 + 19 % 10, 0, 1 + 0xFFFFFFFF % 10]
    assert ids[0, 4:].tolist() == [1] * 22
    np.testing.assert_array_equal(CategoricalLookup(mapping)(tf.constant([texts])).numpy(), ids)


def test_vocabulary_ids_by_hand(tmp_path):
    counts = [(np.array([5, 7, 9], np.uint32), np.array([3, 1, 2]))] * 26
    mapping = CategoricalMapping.from_counts(counts, 2)
    assert mapping.table_sizes() == (4,) * 26  # values 5 and 9 kept, + missing + rare
    values = np.array([[5, 7, 9, 11] + [5] * 22], np.uint32)
    missing = np.zeros((1, 26), bool)
    missing[0, 5] = True
    ids = mapping.ids_np(values, missing)
    assert ids[0, :6].tolist() == [2, 1, 3, 1, 2, 0]
    mapping.save_vocabulary(tmp_path)
    assert (tmp_path / "vocabulary" / "C1.txt").read_text() == "00000005\n00000009\n"
    texts = [["00000005", "00000007", "00000009", "0000000B", "00000005", ""] + ["00000005"] * 20]
    np.testing.assert_array_equal(CategoricalLookup(mapping, str(tmp_path))(tf.constant(texts)).numpy(), ids)


def test_empty_vocabulary_maps_everything_seen_to_the_rare_id(tmp_path):
    counts = [(np.array([5], np.uint32), np.array([1]))] * 26
    mapping = CategoricalMapping.from_counts(counts, 2)
    assert mapping.table_sizes() == (2,) * 26
    mapping.save_vocabulary(tmp_path)
    texts = tf.constant([["00000005"] * 25 + [""]])
    assert CategoricalLookup(mapping, str(tmp_path))(texts).numpy().tolist() == [[1] * 25 + [0]]


def test_vocabulary_files_round_trip_and_refuse_damage(tmp_path):
    keys = np.array([0, 1, 0xABCDEF, 0xFFFFFFFF], np.uint32)
    data = hex_lines(keys)
    assert data == b"00000000\n00000001\n00abcdef\nffffffff\n"
    np.testing.assert_array_equal(parse_hex_lines(data, "x"), keys)
    with pytest.raises(UserError, match="not a tfdlrm vocabulary"):
        parse_hex_lines(b"0000000g\n", "x")
    with pytest.raises(UserError, match="ascending"):
        parse_hex_lines(b"00000002\n00000001\n", "x")


def test_invalid_values_fail_in_the_graph_or_map_to_missing():
    mapping = CategoricalMapping.hashing(10)
    texts = tf.constant([["zzzzzzzz"] + ["00000001"] * 25])
    with pytest.raises(tf.errors.InvalidArgumentError, match="tfdlrm: categorical values"):
        CategoricalLookup(mapping)(texts)
    assert CategoricalLookup(mapping, on_invalid="missing")(texts).numpy()[0, 0] == 0


def _raw_inputs(lines):
    """What a serving request carries for each raw line: float32 counts (NaN missing), hex strings."""
    dense = np.array([[float(x) if x else np.nan for x in python_fields(l)[1]] for l in lines], np.float32)
    cats = np.array([python_fields(l)[2] for l in lines], dtype=object)
    return dense, cats


@pytest.mark.parametrize("mapping_kind", ["hash", "vocabulary"])
def test_converter_twins_equal_the_tensorflow_functions_on_every_real_row(criteo_dir, tmp_path, mapping_kind):
    """The converter's path (byte parser + numpy twins) and the serving path (TensorFlow
    on raw strings and float32 counts) give identical model inputs for every real row."""
    split = criteo_dir / "kaggle_split"
    kwargs = {"hash_buckets": 1000} if mapping_kind == "hash" else {"min_frequency": 2}
    out = tmp_path / "ds"
    convert(ConvertSpec(out=str(out), train=[str(split / "train.txt")], test=[str(split / "test.txt")], **kwargs))
    serving = RawFeatures.from_dataset(str(out))
    mapping = CategoricalMapping.load(out, json.loads((out / "manifest.json").read_text())["mapping"])
    total = 0
    for name in REAL_FILES:
        data = (criteo_dir / name).read_bytes()
        parsed = parse_chunk(data)
        assert len(parsed.bad) == 0 and len(parsed.good) == parsed.lines
        lines = data.decode().splitlines()
        dense, cats = _raw_inputs(lines)
        got = serving(tf.constant(dense), tf.constant(cats.astype(str)))
        np.testing.assert_array_equal(got["dense"].numpy().view(np.int32),
                                      dense_transform_np(parsed.dense).view(np.int32), err_msg=name)
        np.testing.assert_array_equal(got["sparse"].numpy(), mapping.ids_np(parsed.values, parsed.missing),
                                      err_msg=name)
        total += len(lines)
    assert total == 16_267 + 2_686 + 1_000 + 10_000 + 8_953


def test_raw_features_survive_a_savedmodel_round_trip(tmp_path):
    """What the serving export needs: the transform, with its vocabulary files as assets."""
    import shutil

    from tests.helpers.criteo_rows import line, write_lines

    lines = [line(i % 2, [i] + [1] * 12, ["%08x" % (i % 3)] * 26) for i in range(14)]
    write_lines(tmp_path / "train.txt", lines)
    convert(ConvertSpec(out=str(tmp_path / "ds"), inputs=[str(tmp_path / "train.txt")], min_frequency=2))
    module = RawFeatures.from_dataset(str(tmp_path / "ds"))
    module.serve = tf.function(module.__call__, input_signature=[
        tf.TensorSpec([None, 13], tf.float32), tf.TensorSpec([None, 26], tf.string)])
    tf.saved_model.save(module, str(tmp_path / "saved"))
    shutil.rmtree(tmp_path / "ds")  # the SavedModel must not need the dataset any more
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    dense = tf.constant([[3.0, np.nan] + [-1.0] * 11], tf.float32)
    cats = tf.constant([["00000000", "00000002", "", "0000000A"] + ["00000001"] * 22])
    out = loaded.serve(dense, cats)
    np.testing.assert_allclose(out["dense"].numpy()[0, :3], [math.log(4), 0, 0], rtol=1e-6)
    # values 0, 1, 2 were each seen >= 2 times in days 1-6: ids 2, 3, 4; 0xA never: the rare id
    assert out["sparse"].numpy()[0, :5].tolist() == [2, 4, 0, 1, 3]


def test_infinite_counts_are_missing_in_both_twins():
    x = np.array([[np.inf, -np.inf, np.nan, 3.0, -2.0]], np.float32)
    np.testing.assert_array_equal(dense_transform_np(x), [[0, 0, 0, np.float32(math.log1p(3.0)), 0]])
    np.testing.assert_array_equal(dense_transform(x).numpy(), dense_transform_np(x))


def test_raw_examples_parse_back_into_the_raw_request_inputs():
    """The tf.Example schema of the serving export: absent, empty and NaN are missing."""
    from tfdlrm.pipelines.lookup import parse_raw_examples, raw_example

    dense = [[1, None, -3, 2.5, float("nan")] + [7] * 8, list(range(13))]
    cats = [["2d4ea12b", "", None, "ABCDEF01", b"0000000a"] + ["zz"] * 21, ["%08x" % i for i in range(26)]]
    serialized = [raw_example(d, c, label=i).SerializeToString() for i, (d, c) in enumerate(zip(dense, cats))]
    empty_lists = tf.train.Example()
    empty_lists.features.feature["I1"].float_list.SetInParent()
    empty_lists.features.feature["C1"].bytes_list.SetInParent()
    got_dense, got_cats = parse_raw_examples(tf.constant(serialized + [empty_lists.SerializeToString(), b""]))
    want = np.array([[1, np.nan, -3, 2.5, np.nan] + [7] * 8, list(range(13))] + [[np.nan] * 13] * 2, np.float32)
    np.testing.assert_array_equal(got_dense.numpy(), want)
    assert got_cats.numpy()[0, :5].tolist() == [b"2d4ea12b", b"", b"", b"ABCDEF01", b"0000000a"]
    assert got_cats.numpy()[1].tolist() == [b"%08x" % i for i in range(26)]
    assert (got_cats.numpy()[2:] == b"").all()
    example = tf.train.Example()
    example.features.feature["I2"].float_list.value.extend([1.0, 2.0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="tfdlrm: tf.Example feature I2 must hold at most one"):
        parse_raw_examples(tf.constant([example.SerializeToString()]))
    with pytest.raises(ValueError, match="13 dense and 26 categorical"):
        raw_example([1] * 12, [""] * 26)
