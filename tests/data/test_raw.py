"""`tfdlrm generate` (pipelines/raw.py): raw Criteo rows from the synthetic teacher, checked
field by field against Python's own formatting, deterministic by seed, converted without a
bad row; the sidecar's teacher AUC is the AUC of the teacher on the held-out day."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.metrics import exact_auc
from tfdlrm.pipelines import raw
from tfdlrm.pipelines.generators import SyntheticData
from tfdlrm.pipelines.raw import (
    BLOCK_ROWS,
    GenerateSpec,
    RawRows,
    _blocks_in_order,
    format_rows,
    generate,
    hex8,
)


def _python_lines(label, counts, values, dense_missing, categorical_missing) -> list[str]:
    """The rows formatted by Python, field by field (counts clipped below 10**10)."""
    return ["\t".join([str(int(label[i]))]
                      + ["" if dense_missing[i, j] else str(min(int(counts[i, j]), 10**10 - 1)) for j in range(13)]
                      + ["" if categorical_missing[i, j] else f"{int(values[i, j]):08x}" for j in range(26)])
            for i in range(len(label))]


# The widest count picks one, two or three base-10,000 groups a count (and the clip at 10**10).
@pytest.mark.parametrize("top", [9, 9_999, 10_000, 10**8 - 1, 10**8, 10**10 - 1, 10**12])
def test_format_rows_equals_python_formatting(top):
    rng = np.random.default_rng(top)
    n = 300
    label = rng.integers(0, 2, n).astype(np.uint8)
    counts = np.where(rng.random((n, 13)) < 0.5, rng.integers(0, 10, (n, 13)), rng.integers(0, top + 1, (n, 13)))
    edges = [c for c in (0, 1, 9, 10, 99, 100, 999, 1000, 9999, 10**4, 10**4 + 1, 10**5, 10**8 - 1, 10**8,
                         10**8 + 1, 10**9, 10**10 - 1, 10**10, 10**12) if c <= top] + [top]
    counts.reshape(-1)[:len(edges)] = edges
    values = rng.integers(0, 2**32, (n, 26), dtype=np.uint64).astype(np.uint32)
    values[0, :3] = [0, 0xFFFFFFFF, 0x0A0B0C0D]
    dense_missing, categorical_missing = rng.random((n, 13)) < 0.1, rng.random((n, 26)) < 0.1
    dense_missing[0] = False
    lines = format_rows(label, counts, values, dense_missing, categorical_missing).decode().split("\n")
    assert lines[-1] == "" and lines[:-1] == _python_lines(label, counts, values, dense_missing, categorical_missing)
    assert [bytes(h).decode() for h in hex8(values[0, :3])] == ["00000000", "ffffffff", "0a0b0c0d"]


def test_rows_are_deterministic_and_the_teacher_sees_what_convert_makes():
    rows = RawRows(1000, seed=3, dense_missing=0.1, categorical_missing=0.1)
    a, label, p = rows.block(2, 300)
    assert a == RawRows(1000, seed=3, dense_missing=0.1, categorical_missing=0.1).block(2, 300)[0]
    assert a != rows.block(3, 300)[0]
    counts, ids, d_miss, c_miss, label2, p2 = rows.world.raw_sample(
        300, tf.constant([3, 1_000_003 + 2], tf.int64), 0.1, 0.1)
    np.testing.assert_array_equal(label, label2)
    # The teacher on the converter's view (missing count -> log1p(0), missing value -> left out),
    # computed by TensorFlow (the raw path computes it in numpy): equal up to float rounding.
    dense = np.log1p(counts.astype(np.float64)).astype(np.float32)
    logit = rows.world._teacher_logit(tf.constant(dense), tf.constant(ids), present=tf.constant(~c_miss))
    np.testing.assert_allclose(p, tf.sigmoid(logit).numpy()[:, 0], rtol=1e-5)
    assert 0.05 < d_miss.mean() < 0.15 and 0.05 < c_miss.mean() < 0.15


def test_the_raw_rows_are_the_synthetic_world():
    """The raw path's numpy computation against the synthetic data's TensorFlow one (_draw's ids
    from the same uniforms, _teacher_logit), on a world of uneven tables (some smaller than the
    teacher's 20,000 rows, one of 2**31 - 1), with and without missing values."""
    world = SyntheticData((5, 1000, 30_000, 7, 2**31 - 1, 30_000), num_dense=13, seed=4)
    seed = tf.constant([4, 9], tf.int64)
    draws = world.raw_draws(4000, seed)
    s_dense, s_zero, s_ids = tf.unstack(tf.random.experimental.stateless_split(seed, 6))[:3]
    ids_tf = world._draw(4000, s_dense, s_zero, s_ids)[1].numpy()  # the same uniforms of the ids
    for dense_missing, categorical_missing in ((0.0, 0.0), (0.2, 0.3), (0.0, 0.999)):
        counts, ids, d_miss, c_miss, labels, p = world.raw_rows(draws, dense_missing, categorical_missing)
        np.testing.assert_array_equal(ids, ids_tf)
        normal, u_zero, _, u_label, _, _ = draws
        expected = np.floor(np.exp(world.dense_mu + world.dense_sigma * normal.astype(np.float64)))
        np.testing.assert_array_equal(counts, np.where((u_zero < 0.2) | d_miss, 0, expected))
        dense = np.log1p(counts.astype(np.float64)).astype(np.float32)
        logit = world._teacher_logit(tf.constant(dense), tf.constant(ids), present=tf.constant(~c_miss)).numpy()[:, 0]
        np.testing.assert_allclose(world._raw_teacher_logit(dense, ids, c_miss), logit, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-logit.astype(np.float64))), rtol=1e-5)
        np.testing.assert_array_equal(labels, (u_label < p).astype(np.float32))
        assert abs(c_miss.mean() - categorical_missing) < 0.02 and abs(d_miss.mean() - dense_missing) < 0.02
    assert p.dtype == labels.dtype == np.float32 and ids.dtype == counts.dtype == np.int64


def test_a_block_is_its_rows_formatted_whatever_the_chunks_and_threads(monkeypatch):
    rows = RawRows(100_000, seed=5, dense_missing=0.1, categorical_missing=0.1)
    text, label, p = rows.block(1, 2500)
    counts, ids, d_miss, c_miss, label2, p2 = rows.world.raw_sample(
        2500, tf.constant([5, 1_000_003 + 1], tf.int64), 0.1, 0.1)
    np.testing.assert_array_equal(label, label2)
    np.testing.assert_array_equal(p, p2)
    values = (ids * rows.multipliers.astype(np.int64) + rows.salts.astype(np.int64)) % 2**32  # ids < 2**31
    assert text.decode().split("\n") == _python_lines(label, counts, values, d_miss, c_miss) + [""]
    monkeypatch.setattr(raw, "CHUNK_ROWS", 700)
    assert rows.block(1, 2500)[0] == text
    monkeypatch.setattr(raw, "BLOCK_ROWS", 1000)
    one, three = list(_blocks_in_order(rows, 3500, workers=1)), list(_blocks_in_order(rows, 3500, workers=3))
    assert len(one) == len(three) == 4 and all(a[0] == b[0] and (a[2] == b[2]).all() for a, b in zip(one, three))


def test_a_generated_file_converts_cleanly_and_its_sidecar_is_right(tmp_path):
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    rows = BLOCK_ROWS + 4000  # two blocks
    out = tmp_path / "train.txt.gz"
    info = generate(GenerateSpec(out=str(out), rows=rows, table_rows=500, seed=1), log=lambda s: None)
    sidecar = json.loads((tmp_path / "train.txt.gz.json").read_text())
    assert sidecar == json.loads(json.dumps(info))
    result = convert(ConvertSpec(out=str(tmp_path / "ds"), inputs=[str(out)], format="kaggle", hash_buckets=1000))
    splits = result.manifest["splits"]
    assert sum(s["rows_rejected"] for s in splits.values()) == 0
    assert splits["test"]["rows_written"] == sidecar["held_out"]["rows"]
    # The held-out labels and the teacher's probabilities, recomputed block by block.
    world = RawRows(500, 1, 0.05, 0.05)
    labels, probabilities = [], []
    for block in range(2):
        _, label, p = world.block(block, min(BLOCK_ROWS, rows - block * BLOCK_ROWS))
        labels.append(label)
        probabilities.append(p)
    first = sidecar["held_out"]["first_row"]
    labels, probabilities = np.concatenate(labels)[first:], np.concatenate(probabilities)[first:]
    assert sidecar["held_out"]["teacher_auc"] == pytest.approx(exact_auc(labels, probabilities), abs=1e-12)
    assert sidecar["held_out"]["click_rate"] == pytest.approx(labels.mean())


def test_terabyte_days_and_errors(tmp_path):
    info = generate(GenerateSpec(out=str(tmp_path / "tb"), rows=50, format="terabyte", table_rows=50),
                    log=lambda s: None)
    sizes = [sum(1 for _ in open(tmp_path / "tb" / f"day_{d}")) for d in range(24)]
    assert sizes == [3, 3] + [2] * 22 and info["held_out"]["rows"] == 2
    with pytest.raises(UserError, match="exists"):
        generate(GenerateSpec(out=str(tmp_path / "tb"), rows=50, format="terabyte", table_rows=50),
                 log=lambda s: None)
    with pytest.raises(UserError, match="--rows must be at least 7"):
        generate(GenerateSpec(out=str(tmp_path / "x.txt"), rows=3), log=lambda s: None)
