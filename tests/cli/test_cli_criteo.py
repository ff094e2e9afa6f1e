"""The Criteo commands: convert and train on the real split, and bench, in fresh processes;
train on raw files (twice, the second from the cache) and one-line errors in this process
(``main`` with captured output: TensorFlow is loaded already)."""
import json
import subprocess

import pytest

from tests.helpers import assert_clean_error, run_cli
from tests.helpers.cli import run_main
from tests.helpers.criteo_rows import line, numbered_lines, write_lines


def test_convert_then_train_on_the_real_split(criteo_dir, tmp_path):
    split = criteo_dir / "kaggle_split"
    out = tmp_path / "ds"
    proc = run_cli("convert", "--train", str(split / "train.txt"), "--test", str(split / "test.txt"),
                   "--out", str(out), "--hash-buckets", "5000")
    assert proc.returncode == 0, proc.stderr
    assert "train        16,267       16,267          0" in proc.stdout
    assert "test          2,686        2,686          0" in proc.stdout
    assert proc.stderr == ""  # no progress line when stderr is not a terminal
    proc = run_cli("train", "--preset", "tiny", "--data", str(out), "--steps-per-epoch", "5", "--batch-size", "256",
                   "--eval-batch-size", "4096", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "data criteo" in proc.stdout and "16,267 train / 2,686 eval examples" in proc.stdout
    assert "dlrm held-out: exact AUC" in proc.stdout
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert data["kind"] == "criteo" and len(data["manifest_sha256"]) == 64
    assert data["table_rows"] == [5001] * 26


def test_train_on_raw_files_converts_once_into_the_cache(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(300))
    write_lines(tmp_path / "heldout.txt", numbered_lines(50, start=300))
    args = ("train", "--data", str(tmp_path / "train.txt"), "--eval-data", str(tmp_path / "heldout.txt"),
            "--cache-dir", str(tmp_path / "cache"), "--min-frequency", "2", "--batch-size", "100",
            "--xla", "off")  # the point is the converted cache, not the step
    first = run_main(args)
    assert first.returncode == 0, first.stderr
    assert "into the cache" in first.stdout and "300 train / 50 eval examples" in first.stdout
    second = run_main(args)
    assert second.returncode == 0, second.stderr
    assert "using the converted cache" in second.stdout and "into the cache" not in second.stdout


def test_bench_pipeline_prints_json(tmp_path):
    proc = run_cli("bench", "pipeline", "--rows", "30000", "--repeats", "1", "--batch-sizes", "256", "--json",
                   "--tmp-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"] == 30000
    assert set(result["converter"]) == {"vocabulary (min frequency 1)", "hash (1,000,000 buckets)"}
    assert result["reader"]["batch_256"]["rows_per_second"] > 0
    assert "converter, hash" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # the temporary data is gone


def test_a_bad_row_stops_convert_with_its_file_and_line(tmp_path):
    lines = numbered_lines(20)
    lines[11] = line(dense=["1.5"] + [1] * 12)
    write_lines(tmp_path / "train.txt", lines)
    proc = run_main(["convert", "--input", str(tmp_path / "train.txt"), "--out", str(tmp_path / "ds")])
    assert_clean_error(proc, "train.txt line 12", "I1 is '1.5', not an integer", "--on-bad-row skip")
    assert not (tmp_path / "ds").exists()
    proc = run_main(["convert", "--input", str(tmp_path / "train.txt"), "--out", str(tmp_path / "ds"),
                     "--on-bad-row", "skip"])
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "train.txt line 12: I1 is '1.5'" in proc.stdout


@pytest.mark.parametrize("args, fragments", [
    (["convert", "--input", "x.txt"], ["--out"]),
    (["convert", "--out", "o", "--hash-buckets", "0"], ["--hash-buckets", "positive integer"]),
    (["convert", "--out", "o", "--hash-buckets", "5", "--min-frequency", "2"], ["not allowed with"]),
    (["convert", "--out", "o", "--format", "avazu"], ["--format", "invalid choice"]),
    (["convert", "--out", "o", "--on-bad-row", "ignore"], ["--on-bad-row", "invalid choice"]),
    (["bench"], ["required"]),
    (["bench", "pipeline", "--rows", "0"], ["--rows", "positive integer"]),
    (["train", "--hash-buckets", "10", "--min-frequency", "2"], ["not allowed with"]),
])
def test_bad_flags_give_one_line_errors(args, fragments):
    assert_clean_error(run_main(args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["convert", "--out", "{tmp}/o"], ["nothing to convert"]),
    (["convert", "--input", "{tmp}/missing.txt", "--out", "{tmp}/o"], ["input file not found", "missing.txt"]),
    (["convert", "--train", "{tmp}/a.txt", "--out", "{tmp}/o"], ["--test"]),
    (["convert", "--input", "{tmp}/a.txt", "--format", "terabyte", "--out", "{tmp}/o"], ["day_0 .. day_23"]),
    (["train", "--data", "{tmp}", "--eval-data", "{tmp}/a.txt"], ["--eval-data applies to raw TSV"]),
    (["train", "--data", "{tmp}/a.txt", "--eval-data", "{tmp}/nope.txt"], ["--eval-data file not found"]),
    (["train", "--data", "synthetic", "--hash-buckets", "10"], ["--hash-buckets applies to raw"]),
])
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, args, fragments):
    """In this process (TensorFlow is loaded already): ``main`` returns 2 with one error line."""
    from tfdlrm.cli.main import main

    write_lines(tmp_path / "a.txt", numbered_lines(5))
    argv = [a.format(tmp=tmp_path) for a in args]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert_clean_error(subprocess.CompletedProcess(argv, code, captured.out, captured.err), *fragments)
