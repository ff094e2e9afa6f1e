"""pipelines/convert.py (and splits, vocabulary, cache): conversion round trips, splits, mappings, bad rows, atomic output, cache."""
import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import tfdlrm.pipelines.convert
from tests.helpers.criteo_rows import (
    dataset_rows,
    hash_ids,
    line,
    numbered_lines,
    python_rows,
    read_lines,
    sorted_rows,
    vocabulary_ids,
    write_lines,
)
from tfdlrm.errors import UserError
from tfdlrm.pipelines.cache import cached_conversion
from tfdlrm.pipelines.convert import ConvertSpec, convert
from tfdlrm.pipelines.manifest import SplitWriter
from tfdlrm.pipelines.reader import CriteoDataset
from tfdlrm.pipelines.splits import kaggle_segments


def rows_of(out, split):
    return dataset_rows(CriteoDataset(out).dataset(split, 1000))


def converted(tmp_path, name="ds", **kwargs):
    out = tmp_path / name
    return convert(ConvertSpec(out=str(out), **kwargs)), out


# -- real rows ------------------------------------------------------------------------------------
def test_real_kaggle_split_round_trips_exactly_with_hashing(criteo_dir, tmp_path):
    split = criteo_dir / "kaggle_split"
    result, out = converted(tmp_path, train=[str(split / "train.txt")], test=[str(split / "test.txt")],
                            hash_buckets=100_000, rows_per_block=1000, rows_per_shard=5000)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, lines in (("train", read_lines(split / "train.txt")), ("test", read_lines(split / "test.txt"))):
        counts = manifest["splits"][name]
        assert counts["rows_read"] == counts["rows_written"] == len(lines) and counts["rows_rejected"] == 0
        assert sum(f["rows"] for f in counts["files"]) == len(lines)
        # every converted row equals the row computed independently from the text
        np.testing.assert_array_equal(rows_of(out, name), python_rows(lines, hash_ids(100_000)))
    assert len(manifest["splits"]["train"]["files"]) == 4  # 16,267 rows, 5,000 a shard
    assert manifest["table_sizes"] == [100_001] * 26
    assert manifest["sources"][0]["sha256"] == hashlib.sha256((split / "train.txt").read_bytes()).hexdigest()
    assert result.rows_read == 16_267 + 2_686


def test_real_rows_with_a_frequency_threshold_vocabulary(criteo_dir, tmp_path):
    split = criteo_dir / "kaggle_split"
    train_lines, test_lines = read_lines(split / "train.txt"), read_lines(split / "test.txt")
    _, out = converted(tmp_path, train=[str(split / "train.txt")], test=[str(split / "test.txt")], min_frequency=3)
    ids = vocabulary_ids(train_lines, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["table_sizes"] == ids.sizes
    np.testing.assert_array_equal(rows_of(out, "train"), python_rows(train_lines, ids))
    test_rows = rows_of(out, "test")
    np.testing.assert_array_equal(test_rows, python_rows(test_lines, ids))
    assert (test_rows[:, 14:] == 1).any()  # values unseen (or rare) in training share the rare id


def test_gzip_input_gives_the_same_dataset_as_plain(criteo_dir, tmp_path):
    split = criteo_dir / "kaggle_split"
    for name in ("train.txt", "test.txt"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((split / name).read_bytes()))
    _, plain = converted(tmp_path, "plain", train=[str(split / "train.txt")], test=[str(split / "test.txt")])
    _, packed = converted(tmp_path, "packed", train=[str(tmp_path / "train.txt.gz")],
                          test=[str(tmp_path / "test.txt.gz")])
    for shard in ("train-00000.tfrecord", "test-00000.tfrecord"):
        assert (plain / shard).read_bytes() == (packed / shard).read_bytes()
    for name in os.listdir(plain / "vocabulary"):
        assert (plain / "vocabulary" / name).read_bytes() == (packed / "vocabulary" / name).read_bytes()
    source = json.loads((packed / "manifest.json").read_text())["sources"][0]
    assert source["gzip"] is True and source["lines"] == 16_267


def test_terabyte_rows_split_by_day_files(criteo_dir, tmp_path):
    lines = read_lines(criteo_dir / "criteo_1tb_day0_head1000.txt")
    write_lines(tmp_path / "day_0", lines[:500])
    (tmp_path / "day_1.gz").write_bytes(gzip.compress(("\n".join(lines[500:800]) + "\n").encode()))
    write_lines(tmp_path / "day_23", lines[800:])
    inputs = [str(tmp_path / n) for n in ("day_23", "day_1.gz", "day_0")]  # any order: days come from names
    _, out = converted(tmp_path, inputs=inputs, format="terabyte", hash_buckets=1000)
    np.testing.assert_array_equal(rows_of(out, "train"), python_rows(lines[:800], hash_ids(1000)))
    np.testing.assert_array_equal(rows_of(out, "test"), python_rows(lines[800:], hash_ids(1000)))
    _, halves = converted(tmp_path, "halves", inputs=inputs, format="terabyte", hash_buckets=1000,
                          halve_held_out=True)
    np.testing.assert_array_equal(rows_of(halves, "val"), python_rows(lines[800:900], hash_ids(1000)))
    np.testing.assert_array_equal(rows_of(halves, "test"), python_rows(lines[900:], hash_ids(1000)))


def test_terabyte_split_needs_day_names_and_day_23(tmp_path):
    write_lines(tmp_path / "day_0", numbered_lines(5))
    write_lines(tmp_path / "monday.txt", numbered_lines(5))
    with pytest.raises(UserError, match="no day_23"):
        converted(tmp_path, inputs=[str(tmp_path / "day_0")], format="terabyte")
    with pytest.raises(UserError, match="named day_0 .. day_23"):
        converted(tmp_path, inputs=[str(tmp_path / "monday.txt")], format="terabyte")


# -- the Kaggle day split ---------------------------------------------------------------------------
def test_kaggle_days_follow_array_split():
    segs = kaggle_segments(23, halve=False)  # days of 4, 4, 3, 3, 3, 3, 3 lines
    assert [(s.start, s.stop, s.split) for s in segs] == [(0, 20, "train"), (20, 23, "test")]
    segs = kaggle_segments(23, halve=True)
    assert [(s.start, s.stop, s.split) for s in segs] == [(0, 20, "train"), (20, 22, "val"), (22, 23, "test")]
    assert kaggle_segments(70, False)[0].stop == 60


def first_dense_as_int(rows):
    return np.round(np.expm1(rows.view(np.float32)[:, 1].astype(np.float64))).astype(int).tolist()


def test_val_fraction_holds_out_the_last_training_lines_across_files(tmp_path):
    write_lines(tmp_path / "a.txt", numbered_lines(30))
    write_lines(tmp_path / "b.txt", numbered_lines(10, start=30))
    write_lines(tmp_path / "test.txt", numbered_lines(5, start=40))
    _, out = converted(tmp_path, train=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                       test=[str(tmp_path / "test.txt")], hash_buckets=10, val_fraction=0.3)
    assert first_dense_as_int(rows_of(out, "train")) == list(range(28))  # 40 lines, the last 12 -> val
    assert first_dense_as_int(rows_of(out, "val")) == list(range(28, 40))
    assert first_dense_as_int(rows_of(out, "test")) == list(range(40, 45))
    with pytest.raises(UserError, match="leaves no rows"):
        converted(tmp_path, "tiny", train=[str(tmp_path / "test.txt")], test=[str(tmp_path / "b.txt")],
                  hash_buckets=10, val_fraction=0.01)


@pytest.mark.parametrize("halve", [False, True])
def test_kaggle_file_is_split_into_seven_days(tmp_path, halve):
    write_lines(tmp_path / "train.txt", numbered_lines(23))
    _, out = converted(tmp_path, inputs=[str(tmp_path / "train.txt")], hash_buckets=10, halve_held_out=halve)
    assert first_dense_as_int(rows_of(out, "train")) == list(range(20))
    if halve:
        assert first_dense_as_int(rows_of(out, "val")) == [20, 21]
        assert first_dense_as_int(rows_of(out, "test")) == [22]
    else:
        assert first_dense_as_int(rows_of(out, "test")) == [20, 21, 22]
        assert "val" not in CriteoDataset(out).splits


def test_vocabulary_comes_from_the_training_days_only(tmp_path):
    lines = [line(0, cats=["0000000a"] + ["00000001"] * 25)] * 6 + [line(1, cats=["0000000b"] + ["00000001"] * 25)]
    write_lines(tmp_path / "train.txt", lines)
    _, out = converted(tmp_path, inputs=[str(tmp_path / "train.txt")])
    assert (out / "vocabulary" / "C1.txt").read_text() == "0000000a\n"
    assert rows_of(out, "test")[0, 14] == 1  # day 7's value was never seen in training


def test_shuffle_permutes_training_rows_only_and_is_seeded(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(700))
    kwargs = dict(inputs=[str(tmp_path / "train.txt")], hash_buckets=50, rows_per_block=64)
    _, plain = converted(tmp_path, "plain", **kwargs)
    _, a = converted(tmp_path, "a", shuffle=True, seed=3, **kwargs)
    _, b = converted(tmp_path, "b", shuffle=True, seed=3, **kwargs)
    _, c = converted(tmp_path, "c", shuffle=True, seed=4, **kwargs)
    base = rows_of(plain, "train")
    shuffled = rows_of(a, "train")
    assert not np.array_equal(base, shuffled)
    np.testing.assert_array_equal(sorted_rows(base), sorted_rows(shuffled))
    np.testing.assert_array_equal(shuffled, rows_of(b, "train"))
    assert not np.array_equal(shuffled, rows_of(c, "train"))
    np.testing.assert_array_equal(rows_of(plain, "test"), rows_of(a, "test"))


def test_shuffled_vocabulary_conversion_spreads_rows_over_buckets(tmp_path, monkeypatch):
    monkeypatch.setattr(tfdlrm.pipelines.convert, "SHUFFLE_BUCKET_ROWS", 100)  # several buckets
    write_lines(tmp_path / "train.txt", numbered_lines(700))
    _, plain = converted(tmp_path, "plain", inputs=[str(tmp_path / "train.txt")])
    _, mixed = converted(tmp_path, "mixed", inputs=[str(tmp_path / "train.txt")], shuffle=True)
    np.testing.assert_array_equal(sorted_rows(rows_of(plain, "train")), sorted_rows(rows_of(mixed, "train")))
    order = first_dense_as_int(rows_of(mixed, "train"))
    assert order != sorted(order) and sorted(order) == list(range(600))


def test_blocks_and_shards(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(1000))
    write_lines(tmp_path / "test.txt", numbered_lines(10, start=1000))
    _, out = converted(tmp_path, train=[str(tmp_path / "train.txt")], test=[str(tmp_path / "test.txt")],
                       hash_buckets=10, rows_per_block=64, rows_per_shard=300)
    files = json.loads((out / "manifest.json").read_text())["splits"]["train"]["files"]
    assert [f["rows"] for f in files] == [320, 320, 320, 40]  # shards hold whole blocks
    assert [f["blocks"] for f in files] == [5, 5, 5, 1]
    assert first_dense_as_int(rows_of(out, "train")) == list(range(1000))


# -- bad input ---------------------------------------------------------------------------------------
MALFORMED = {
    "wrong field count": (line()[:-9], "field_count", "39 tab-separated fields, expected 40"),
    "non-integer dense": (line(dense=[1, 2, "x7"] + [1] * 10), "dense", "I3 is 'x7', not an integer"),
    "bad hex": (line(cats=["00000001"] * 4 + ["0000zz01"] + ["00000001"] * 21), "categorical",
                "C5 is '0000zz01', not 8 hex digits"),
    "label not 0/1": ("7" + line()[1:], "label", "label is '7', expected 0 or 1"),
    "blank line": ("", "blank_line", "blank line"),
}


def write_split_with_bad_row(tmp_path, bad: str) -> None:
    """train.txt: 10 good rows with ``bad`` as line 5; test.txt: 3 good rows."""
    lines = numbered_lines(10)
    lines.insert(4, bad)
    write_lines(tmp_path / "train.txt", lines)
    write_lines(tmp_path / "test.txt", numbered_lines(3))


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_row_stops_the_conversion_with_file_and_line(tmp_path, kind):
    bad, _, reason = MALFORMED[kind]
    write_split_with_bad_row(tmp_path, bad)
    with pytest.raises(UserError) as error:
        converted(tmp_path, train=[str(tmp_path / "train.txt")], test=[str(tmp_path / "test.txt")])
    assert f"train.txt line 5: {reason}" in str(error.value)
    assert not (tmp_path / "ds").exists()
    assert set(os.listdir(tmp_path)) == {"train.txt", "test.txt"}  # no partial directory left


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_row_is_counted_and_skipped(tmp_path, kind):
    bad, bad_kind, reason = MALFORMED[kind]
    write_split_with_bad_row(tmp_path, bad)
    result, out = converted(tmp_path, train=[str(tmp_path / "train.txt")], test=[str(tmp_path / "test.txt")],
                            on_bad_row="skip", hash_buckets=10)
    counts = result.manifest["splits"]["train"]
    assert (counts["rows_read"], counts["rows_written"], counts["rows_rejected"]) == (11, 10, 1)
    assert counts["rejected_by_kind"][bad_kind] == 1 and sum(counts["rejected_by_kind"].values()) == 1
    example = result.manifest["bad_rows"]["examples"][0]
    assert example["line"] == 5 and example["kind"] == bad_kind and reason in example["reason"]
    assert "train.txt line 5" in result.summary()
    assert first_dense_as_int(rows_of(out, "train")) == list(range(10))


def test_skip_mode_counts_add_up_per_split_in_a_day_split(tmp_path):
    lines = numbered_lines(70)
    for at in (3, 30, 65, 68):  # three in the training days, two in day 7 after insertion shifts
        lines.insert(at, "garbage")
    write_lines(tmp_path / "train.txt", lines)  # 74 lines: days of 11, 11, 11, 11, 10, 10, 10
    result, _ = converted(tmp_path, inputs=[str(tmp_path / "train.txt")], on_bad_row="skip", hash_buckets=10)
    splits = result.manifest["splits"]
    assert (splits["train"]["rows_read"], splits["train"]["rows_rejected"]) == (64, 2)
    assert (splits["test"]["rows_read"], splits["test"]["rows_rejected"]) == (10, 2)
    for s in splits.values():
        assert s["rows_read"] == s["rows_written"] + s["rows_rejected"]


def test_crlf_files_convert_like_lf_files(tmp_path):
    lines = numbered_lines(50)
    write_lines(tmp_path / "lf.txt", lines)
    write_lines(tmp_path / "crlf.txt", lines, ending="\r\n")
    _, lf = converted(tmp_path, "lf", inputs=[str(tmp_path / "lf.txt")])
    _, crlf = converted(tmp_path, "crlf", inputs=[str(tmp_path / "crlf.txt")])
    for split in ("train", "test"):
        np.testing.assert_array_equal(rows_of(lf, split), rows_of(crlf, split))


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_file_problems_stop_the_conversion_in_both_modes(tmp_path, policy):
    write_lines(tmp_path / "test.txt", numbered_lines(3))
    data = gzip.compress("\n".join(numbered_lines(3000)).encode())
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.txt").write_bytes(b"")
    cases = [("cut.gz", "truncated gzip"), ("empty.txt", "is empty"), ("missing.txt", "input file not found")]
    for name, message in cases:
        with pytest.raises(UserError, match=message):
            converted(tmp_path, train=[str(tmp_path / name)], test=[str(tmp_path / "test.txt")], on_bad_row=policy)
        assert not (tmp_path / "ds").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no partial directory left


def test_a_split_with_no_valid_rows_is_an_error(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(5))
    write_lines(tmp_path / "test.txt", ["bad", "rows"])
    with pytest.raises(UserError, match=r"the test split has no valid rows \(2 bad rows skipped\)"):
        converted(tmp_path, train=[str(tmp_path / "train.txt")], test=[str(tmp_path / "test.txt")],
                  on_bad_row="skip")


def test_output_is_atomic_when_interrupted(tmp_path, monkeypatch):
    write_lines(tmp_path / "train.txt", numbered_lines(500))
    calls = []

    def interrupted(self, block):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, block)

    original = SplitWriter._write_block
    monkeypatch.setattr(SplitWriter, "_write_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        converted(tmp_path, inputs=[str(tmp_path / "train.txt")], hash_buckets=10, rows_per_block=50)
    assert os.listdir(tmp_path) == ["train.txt"]


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(50))
    _, out = converted(tmp_path, inputs=[str(tmp_path / "train.txt")], hash_buckets=10)
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match="already exists"):
        converted(tmp_path, inputs=[str(tmp_path / "train.txt")], hash_buckets=20)
    assert (out / "manifest.json").read_text() == before
    converted(tmp_path, inputs=[str(tmp_path / "train.txt")], hash_buckets=20, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["table_sizes"][0] == 21
    assert sorted(os.listdir(tmp_path)) == ["ds", "train.txt"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "nothing to convert"),
    (dict(inputs=["a"], train=["b"], test=["c"]), "not both"),
    (dict(train=["a"]), "--test"),
    (dict(test=["a"]), "--train"),
    (dict(inputs=["a"], hash_buckets=10, min_frequency=2), "not both"),
    (dict(inputs=["a"], hash_buckets=0), "--hash-buckets"),
    (dict(inputs=["a"], min_frequency=0), "--min-frequency"),
    (dict(inputs=["a"], format="criteo"), "--format"),
    (dict(inputs=["a"], on_bad_row="ignore"), "--on-bad-row"),
    (dict(train=["a"], test=["b"], halve_held_out=True), "--halve-held-out"),
])
def test_bad_specs(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        converted(tmp_path, **kwargs)


def test_same_file_twice_and_too_few_lines(tmp_path):
    write_lines(tmp_path / "a.txt", numbered_lines(5))
    with pytest.raises(UserError, match="given twice"):
        converted(tmp_path, train=[str(tmp_path / "a.txt")], test=[str(tmp_path / "a.txt")])
    with pytest.raises(UserError, match="too few to split into 7 days"):
        converted(tmp_path, inputs=[str(tmp_path / "a.txt")])


# -- the cache for raw files ----------------------------------------------------------------------------
def test_raw_files_are_converted_once_into_the_cache(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(60))
    write_lines(tmp_path / "heldout.txt", numbered_lines(9, start=60))
    logs = []
    first = cached_conversion(str(tmp_path / "train.txt"), str(tmp_path / "heldout.txt"), str(tmp_path / "cache"),
                              log=logs.append)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = cached_conversion(str(tmp_path / "train.txt"), str(tmp_path / "heldout.txt"), str(tmp_path / "cache"),
                              log=logs.append)
    assert again == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    assert "using the converted cache" in logs[-1]
    assert first_dense_as_int(rows_of(first, "test")) == list(range(60, 69))
    other = cached_conversion(str(tmp_path / "train.txt"), str(tmp_path / "heldout.txt"), str(tmp_path / "cache"),
                              hash_buckets=10, log=logs.append)
    assert other != first
    write_lines(tmp_path / "train.txt", numbered_lines(61))  # the file changed: convert again
    changed = cached_conversion(str(tmp_path / "train.txt"), str(tmp_path / "heldout.txt"),
                                str(tmp_path / "cache"), log=logs.append)
    assert changed not in (first, other) and CriteoDataset(changed).rows("train") == 61
    days = cached_conversion(str(tmp_path / "train.txt"), None, str(tmp_path / "cache"), log=logs.append)
    assert CriteoDataset(days).rows("train") + CriteoDataset(days).rows("test") == 61
    shutil.rmtree(tmp_path / "cache")


def test_progress_line_reports_rows_per_second_when_asked(tmp_path, capsys):
    write_lines(tmp_path / "train.txt", numbered_lines(100))
    converted(tmp_path, inputs=[str(tmp_path / "train.txt")], progress=True)
    err = capsys.readouterr().err
    assert "counting lines of train.txt" in err and "rows/s" in err and "100.0%" in err
    converted(tmp_path, "quiet", inputs=[str(tmp_path / "train.txt")])  # not a terminal: no progress line
    assert capsys.readouterr().err == ""
