"""`tfdlrm generate` (pipelines/raw.py): raw Criteo rows from the synthetic teacher, checked
field by field against Python's own formatting, deterministic by seed, converted without a
bad row; the sidecar's teacher AUC is the AUC of the teacher on the held-out day."""
import json

import numpy as np
import pytest
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.metrics import exact_auc
from tfdlrm.pipelines.raw import (
    BLOCK_ROWS,
    GenerateSpec,
    RawRows,
    format_rows,
    generate,
    hex8,
)


def test_format_rows_equals_python_formatting():
    rng = np.random.default_rng(0)
    n = 500
    label = rng.integers(0, 2, n).astype(np.uint8)
    counts = np.where(rng.random((n, 13)) < 0.5, rng.integers(0, 10, (n, 13)), rng.integers(0, 10**9, (n, 13)))
    values = rng.integers(0, 2**32, (n, 26), dtype=np.uint64).astype(np.uint32)
    values[0, :3] = [0, 0xFFFFFFFF, 0x0A0B0C0D]
    dense_missing, categorical_missing = rng.random((n, 13)) < 0.1, rng.random((n, 26)) < 0.1
    lines = format_rows(label, counts, values, dense_missing, categorical_missing).decode().split("\n")
    assert lines[-1] == "" and len(lines) == n + 1
    for i, line in enumerate(lines[:-1]):
        expected = [str(label[i])] + ["" if dense_missing[i, j] else str(counts[i, j]) for j in range(13)] + \
                   ["" if categorical_missing[i, j] else f"{values[i, j]:08x}" for j in range(26)]
        assert line == "\t".join(expected)
    assert [bytes(h).decode() for h in hex8(values[0, :3])] == ["00000000", "ffffffff", "0a0b0c0d"]


def test_rows_are_deterministic_and_the_teacher_sees_what_convert_makes():
    rows = RawRows(1000, seed=3, dense_missing=0.1, categorical_missing=0.1)
    a, label, p = rows.block(2, 300)
    assert a == RawRows(1000, seed=3, dense_missing=0.1, categorical_missing=0.1).block(2, 300)[0]
    assert a != rows.block(3, 300)[0]
    counts, ids, d_miss, c_miss, label2, p2 = rows.world.raw_sample(
        300, tf.constant([3, 1_000_003 + 2], tf.int64), 0.1, 0.1)
    np.testing.assert_array_equal(label, label2)
    # The teacher on the converter's view (missing count -> log1p(0), missing value -> left out).
    dense = np.log1p(counts.astype(np.float64)).astype(np.float32)
    logit = rows.world._teacher_logit(tf.constant(dense), tf.constant(ids), present=tf.constant(~c_miss))
    np.testing.assert_allclose(p, tf.sigmoid(logit).numpy()[:, 0], rtol=1e-6)
    assert 0.05 < d_miss.mean() < 0.15 and 0.05 < c_miss.mean() < 0.15


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
