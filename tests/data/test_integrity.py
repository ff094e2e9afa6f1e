"""Integrity of converted datasets: sizes and sha256 of every shard and vocabulary file in the
manifest, shard paths confined to the dataset, rows and blocks checked against the files, held-out
shards checked before training, ``verify_data``, damaged records named by file and record, the
export's vocabulary check; and the UTF-8 byte order mark and truncated-gzip position of the readers."""
import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import yaml

import tfdlrm
from tests.helpers.cli import run_main
from tests.helpers.criteo_rows import dataset_rows, numbered_lines, write_lines
from tests.helpers.tables import SPEC, make_rows, write_table
from tfdlrm.errors import UserError
from tfdlrm.pipelines.convert import ConvertSpec, convert
from tfdlrm.pipelines.manifest import RECORD_OVERHEAD, read_manifest
from tfdlrm.pipelines.reader import CriteoDataset
from tfdlrm.pipelines.sources import damaged_data_named, open_data

BLOCK_ROWS, SHARD_ROWS = 64, 512  # 2,000 training rows: shards of 512, 512, 512, 464 rows; 500 test rows
TINY = tfdlrm.get_preset("tiny")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A vocabulary-mode dataset, and a second one whose test shard has the same layout and size."""
    root = tmp_path_factory.mktemp("integrity")
    write_lines(root / "train.txt", numbered_lines(2000))
    write_lines(root / "test.txt", numbered_lines(500, start=2000))
    write_lines(root / "other.txt", numbered_lines(500, start=5000, seed=7))
    for name, test in (("ds", "test.txt"), ("other", "other.txt")):
        convert(ConvertSpec(out=str(root / name), train=[str(root / "train.txt")], test=[str(root / test)],
                            rows_per_block=BLOCK_ROWS, rows_per_shard=SHARD_ROWS, progress=False), log=lambda s: None)
    return root


@pytest.fixture
def ds(made, tmp_path):
    """A fresh copy of the dataset, to damage."""
    return shutil.copytree(made / "ds", tmp_path / "ds")


def manifest_of(path):
    return json.loads((path / "manifest.json").read_text())


def rewrite(path, change) -> None:
    manifest = manifest_of(path)
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


# -- what convert records -----------------------------------------------------------------------
def test_convert_records_size_and_sha256_of_every_shard_and_vocabulary_file(made, tmp_path):
    ds = made / "ds"
    manifest = manifest_of(ds)
    files = [f for s in manifest["splits"].values() for f in s["files"]]
    assert len(files) == 5
    for f in files:
        assert f["bytes"] == (ds / f["path"]).stat().st_size == RECORD_OVERHEAD * f["blocks"] + 160 * f["rows"]
        assert f["sha256"] == sha256(ds / f["path"])
    vocabulary = manifest["vocabulary_files"]
    assert [v["path"] for v in vocabulary] == [f"vocabulary/C{i}.txt" for i in range(1, 27)]
    for v in vocabulary:
        assert (v["bytes"], v["sha256"]) == ((ds / v["path"]).stat().st_size, sha256(ds / v["path"]))
    convert(ConvertSpec(out=str(tmp_path / "hashed"), train=[str(made / "train.txt")], test=[str(made / "test.txt")],
                        hash_buckets=50, progress=False), log=lambda s: None)
    assert manifest_of(tmp_path / "hashed")["vocabulary_files"] == []  # hashing writes no vocabulary


def test_own_features_record_their_shards_and_vocabulary_files(tmp_path):
    from tfdlrm.pipelines.tabular import TabularSpec, convert_tabular

    (tmp_path / "spec.yaml").write_text(SPEC)
    write_table(tmp_path / "train.csv", make_rows(300, 1))
    write_table(tmp_path / "test.csv", make_rows(50, 2))
    out = tmp_path / "mine"
    convert_tabular(TabularSpec(out=str(out), features=str(tmp_path / "spec.yaml"), train=[str(tmp_path / "train.csv")],
                                test=[str(tmp_path / "test.csv")], rows_per_block=32, progress=False),
                    log=lambda s: None)
    manifest = manifest_of(out)
    assert [v["path"] for v in manifest["vocabulary_files"]] == ["vocabulary/region.txt", "vocabulary/labels.txt"]
    for v in manifest["vocabulary_files"]:
        assert (v["bytes"], v["sha256"]) == ((out / v["path"]).stat().st_size, sha256(out / v["path"]))
    for f in (f for s in manifest["splits"].values() for f in s["files"]):
        assert f["sha256"] == sha256(out / f["path"])
    (out / "vocabulary" / "region.txt").write_text("south\nnorth\neast\nwest\n")  # two ids swapped
    with pytest.raises(UserError, match=r"vocabulary/region.txt is not the vocabulary the conversion wrote"):
        open_data(str(out), TINY, verify_data=True)


# -- manifest paths, rows and blocks -------------------------------------------------------------
@pytest.mark.parametrize("path", ["../train.txt", "/etc/passwd", "vocabulary/../../x.tfrecord", "", None])
def test_shard_paths_must_stay_inside_the_dataset(ds, path):
    rewrite(ds, lambda m: m["splits"]["test"]["files"][0].update(path=path))
    with pytest.raises(UserError, match=r"outside the dataset directory|has the path"):
        read_manifest(ds)
    with pytest.raises(UserError):  # even where files are not opened (export reads the manifest so)
        read_manifest(ds, check_files=False)


def test_a_shard_linked_out_of_the_dataset_is_refused(ds, tmp_path):
    outside = tmp_path / "elsewhere.tfrecord"
    shutil.move(ds / "test-00000.tfrecord", outside)
    os.symlink(outside, ds / "test-00000.tfrecord")
    with pytest.raises(UserError, match=r"test-00000.tfrecord is a link to .*elsewhere.tfrecord, outside the dataset"):
        CriteoDataset(ds)
    os.unlink(ds / "test-00000.tfrecord")
    os.makedirs(ds / "inside")
    shutil.move(outside, ds / "inside" / "real.tfrecord")
    os.symlink(ds / "inside" / "real.tfrecord", ds / "test-00000.tfrecord")
    assert CriteoDataset(ds).rows("test") == 500  # a link that stays inside is fine


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(rows=f["rows"] - 1), "rows in 8 records"),
    (lambda f: f.update(blocks=f["blocks"] + 1), "cannot be"),
    (lambda f: f.update(bytes=f["bytes"] + 16), "cannot be"),
    (lambda f: f.update(rows="512"), "cannot be"),
    (lambda f: f.update(sha256="abc"), "the sha256 of train-00001.tfrecord is 'abc'"),
])
def test_rows_blocks_and_bytes_must_fit_the_record_layout(ds, change, message):
    rewrite(ds, lambda m: change(m["splits"]["train"]["files"][1]))
    with pytest.raises(UserError, match=message):
        CriteoDataset(ds)


def test_the_files_rows_must_add_up_to_the_split_and_be_listed_once(ds):
    rewrite(ds, lambda m: m["splits"]["train"].update(rows_written=1999))
    with pytest.raises(UserError, match=r"train split's files hold 2,000 rows, its rows_written says 1,999"):
        CriteoDataset(ds)
    rewrite(ds, lambda m: m["splits"]["train"].update(rows_written=2512))
    rewrite(ds, lambda m: m["splits"]["train"]["files"].append(m["splits"]["train"]["files"][0]))
    with pytest.raises(UserError, match=r"lists train-00000.tfrecord twice"):
        CriteoDataset(ds)


def test_a_foreign_shard_of_the_same_size_but_another_layout_is_refused_on_open(ds):
    # 511 rows in 18 records of up to 29 rows: 18 * 16 + 511 * 160 bytes, the size of 512 rows in 8 records
    import tensorflow as tf

    rows = np.zeros((511, 40), "<i4")
    with tf.io.TFRecordWriter(str(ds / "train-00001.tfrecord")) as writer:
        for start in range(0, 511, 29):
            writer.write(rows[start:start + 29].tobytes())
    assert (ds / "train-00001.tfrecord").stat().st_size == manifest_of(ds)["splits"]["train"]["files"][1]["bytes"]
    with pytest.raises(UserError, match=r"train-00001.tfrecord is not the shard the conversion wrote: record 1 of 8 "
                                        r"\(byte 0\) should hold 10,240 bytes of rows, its header says 4,640"):
        CriteoDataset(ds)


# -- held-out shards before training; everything with verify_data ---------------------------------
def test_a_damaged_held_out_shard_is_found_when_the_data_is_opened(ds):
    flip(ds / "test-00000.tfrecord", 50_000)
    with pytest.raises(UserError, match=r"test-00000.tfrecord \(test split\) is damaged: record 5 of 8 "
                                        r"\(rows 257-320 of the file\) fails its checksum"):
        open_data(str(ds), TINY)


def test_a_foreign_held_out_shard_of_the_same_layout_is_found_when_the_data_is_opened(ds, made):
    shutil.copy(made / "other" / "test-00000.tfrecord", ds / "test-00000.tfrecord")
    with pytest.raises(UserError, match=r"test-00000.tfrecord \(test split\) is not the file the conversion wrote "
                                        r"\(its sha256 differs from the manifest's\), though its records read as valid"):
        open_data(str(ds), TINY)


def test_verify_data_checks_the_training_shards_and_the_vocabulary(ds):
    first, second = ds / "train-00000.tfrecord", ds / "train-00001.tfrecord"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)  # two shards swapped: same sizes, valid records
    source = open_data(str(ds), TINY)  # held-out checked only: opens
    assert source.train_examples == 2000 and source.notes == ()
    with pytest.raises(UserError, match=r"train-00000.tfrecord \(train split\) is not the file the conversion wrote"):
        open_data(str(ds), TINY, verify_data=True)
    first.write_bytes(a)
    second.write_bytes(b)
    assert open_data(str(ds), TINY, verify_data=True).notes == ()
    vocabulary = ds / "vocabulary" / "C1.txt"
    lines = vocabulary.read_text().splitlines()
    vocabulary.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same size, ids shifted
    with pytest.raises(UserError, match=r"vocabulary/C1.txt is not the vocabulary the conversion wrote"):
        open_data(str(ds), TINY, verify_data=True)
    vocabulary.unlink()
    with pytest.raises(UserError, match=r"the vocabulary file vocabulary/C1.txt is missing"):
        open_data(str(ds), TINY, verify_data=True)
    with pytest.raises(UserError, match="--verify-data"):
        open_data("synthetic", TINY, verify_data=True)


def test_datasets_converted_before_checksums_still_open_with_a_note(ds):
    def strip(manifest):
        del manifest["vocabulary_files"]
        for split in manifest["splits"].values():
            for f in split["files"]:
                del f["sha256"]

    rewrite(ds, strip)
    source = open_data(str(ds), TINY, verify_data=True)
    assert len(source.notes) == 2 and "without sha256 checksums" in source.notes[0]
    assert "vocabulary files" in source.notes[1]
    np.testing.assert_array_equal(dataset_rows(source.eval_dataset(100)),
                                  dataset_rows(CriteoDataset(ds).dataset("test", 100)))
    flip(ds / "test-00000.tfrecord", 50_000)  # the TFRecord checksums still find a damaged record
    with pytest.raises(UserError, match=r"test-00000.tfrecord \(test split\) is damaged: record 5 of 8"):
        open_data(str(ds), TINY)


# -- a damaged record while training --------------------------------------------------------------
def test_a_damaged_training_record_is_one_line_naming_file_and_record(ds):
    flip(ds / "train-00001.tfrecord", 30_000)
    source = open_data(str(ds), TINY)  # the training split is not hashed on open
    with pytest.raises(UserError, match=r"train-00001.tfrecord \(train split\) is damaged: record 3 of 8 \(rows "
                                        r"129-192 of the file\) fails its checksum: corrupted record at 20524"):
        with damaged_data_named(source):
            for _ in source.train_dataset(128, seed=1):
                pass
    proc = run_main(["train", "--data", str(ds), "--batch-size", "256", "--optimizer", "adagrad", "--lr", "0.05"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {ds}/train-00001.tfrecord (train split) is "
                                                            f"damaged: record 3 of 8")


def test_other_damaged_files_are_one_line_too():
    import tensorflow as tf

    from tfdlrm.cli.main import data_loss_message

    error = tf.errors.DataLossError(None, None, "Graph execution error:\n\nDetected at node IteratorGetNext defined "
                                                "at (most recent call last):\n  File \"x.py\", line 1, in f\n\n"
                                                "corrupted record at 5\n\t [[{{node IteratorGetNext}}]] "
                                                "[Op:__inference_train_function_2085]")
    assert data_loss_message(error) == "a file is damaged: corrupted record at 5 (restore or recreate it)"
    assert data_loss_message(ValueError("corrupted record at 5")) is None


def test_verify_data_is_a_train_flag_and_no_setting_of_the_run():
    from tfdlrm.cli.parser import build_parser
    from tfdlrm.training.spec import TrainSpec

    assert build_parser().parse_args(["train", "--verify-data"]).verify_data is True
    assert build_parser().parse_args(["train"]).verify_data is False
    assert "verify_data" not in TrainSpec(verify_data=True).to_dict()  # a resumed run may add or drop it


# -- export -----------------------------------------------------------------------------------------
def test_export_checks_the_vocabulary_and_records_it_in_assets_extra(ds, tmp_path):
    from tfdlrm.serving.export import write_saved_model
    from tfdlrm.serving.signatures import serving_features
    from tfdlrm.training.compile import build_model

    source = open_data(str(ds), TINY)
    meta = {"data": source.describe()}
    features, info = serving_features(meta, source.config)
    assert info["vocabulary_verified"] is True and len(info["vocabulary_files"]) == 26
    assert info["vocabulary_files"][0] == {**manifest_of(ds)["vocabulary_files"][0], "asset": "C1.txt"}
    out = tmp_path / "saved"
    write_saved_model(out, build_model("dlrm", source.config), "dlrm", features, info)
    recorded = json.loads((out / "assets.extra" / "export.json").read_text())["vocabulary_files"]
    assert [sha256(out / "assets" / f["asset"]) for f in recorded] == [f["sha256"] for f in recorded]

    vocabulary = ds / "vocabulary" / "C7.txt"
    vocabulary.write_bytes(vocabulary.read_bytes()[9:] + vocabulary.read_bytes()[:9])  # a value moved: ids shift
    with pytest.raises(UserError, match=r"vocabulary/C7.txt is not the vocabulary the conversion wrote"):
        serving_features(meta, source.config)


# -- the readers: a byte order mark, a truncated small gzip --------------------------------------------
def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    from tfdlrm.pipelines.spec import FeatureSpec
    from tfdlrm.pipelines.table_reader import TableReader
    from tfdlrm.pipelines.tsv import ChunkReader

    lines = numbered_lines(50)
    text = "".join(line + "\n" for line in lines).encode()
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text)
    (tmp_path / "bom.txt.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + text))
    for name in ("bom.txt", "bom.txt.gz"):
        read = b"".join(b"".join(pieces) for _, pieces in ChunkReader(str(tmp_path / name), chunk_bytes=1000))
        assert read == text
    write_lines(tmp_path / "test.txt", numbered_lines(20, start=50))
    convert(ConvertSpec(out=str(tmp_path / "ds"), train=[str(tmp_path / "bom.txt")], test=[str(tmp_path / "test.txt")],
                        hash_buckets=50, progress=False), log=lambda s: None)
    assert manifest_of(tmp_path / "ds")["splits"]["train"]["rows_written"] == 50

    write_table(tmp_path / "t.csv", make_rows(5, 1))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "t.csv").read_bytes())
    reader = TableReader(str(tmp_path / "bom.csv"), FeatureSpec.from_dict(yaml.safe_load(SPEC)))
    assert reader.header[0] == "price" and sum(chunk.rows for chunk in reader.chunks()) == 5


def test_a_truncated_small_gzip_names_the_last_line_it_holds(tmp_path):
    from tfdlrm.pipelines.tsv import ChunkReader

    text = "".join(line + "\n" for line in numbered_lines(400)).encode()
    packed = gzip.compress(text)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(packed[: len(packed) * 3 // 4])
    with pytest.raises(UserError, match=r"cut.gz: truncated gzip file: its text breaks off after line ([\d,]+)") as e:
        list(ChunkReader(str(cut)))  # one 8 MiB chunk: before, "after line 0"
    after = int(e.value.args[0].split("after line ")[1].split(" ")[0].replace(",", ""))
    assert 0 < after < 400 and after == zlib_prefix_lines(cut.read_bytes())


def zlib_prefix_lines(data: bytes) -> int:
    """Whole lines in what a truncated gzip stream decompresses to (independently, with zlib)."""
    import zlib

    return zlib.decompressobj(wbits=31).decompress(data).count(b"\n")
