"""The command line: help and a real run in fresh processes; one-line errors for bad input in
this process (``main`` with captured output: TensorFlow is loaded already)."""
import json

import pytest

from tests.helpers import assert_clean_error, run_cli
from tests.helpers.cli import run_main


def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "compare", "presets"):
        assert command in proc.stdout


def test_train_runs_end_to_end_and_prints_exact_auc(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "dlrm", "--preset", "tiny", "--data", "synthetic", "--train-examples", "20480",
                   "--eval-examples", "4096", "--batch-size", "256", "--optimizer", "adagrad", "--lr", "0.05",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "dlrm held-out: exact AUC" in proc.stdout and "teacher AUC" in proc.stdout
    assert "Traceback" not in proc.stderr
    # batch 256 on one device: one thread an op, an op a core at once (tfdlrm/training/threads.py)
    from tfdlrm.training.threads import cores

    expected = f"threads: intra-op 1, inter-op {cores()}" if cores() > 1 else "threads: intra-op TensorFlow's"
    assert expected in proc.stdout
    assert json.loads((out / "run.json").read_text())["model"] == "dlrm"
    assert (out / "checkpoints" / "checkpoint").is_file()


@pytest.mark.parametrize("args, fragments", [
    (["train", "--preset", "huge"], ["--preset", "invalid choice"]),
    (["train", "--epochs", "0"], ["--epochs", "positive integer"]),
    (["train", "--batch-size", "many"], ["--batch-size", "'many'"]),
    (["train", "--lr", "-0.1"], ["--lr", "positive"]),
    (["train", "--lr", "nan"], ["--lr", "positive"]),
    (["train", "--model", "mlp"], ["--model", "invalid choice"]),
    (["train", "--bottom-mlp", "13-x-8"], ["--bottom-mlp", "dash-separated"]),
    (["compare", "--models", "dlrm,wide"], ["--models", "dlrm, dcn, dcn-v2"]),
    (["compare", "--seeds", "1,b"], ["--seeds", "integers"]),
    (["train", "--no-such-flag"], ["unrecognized arguments"]),
])
def test_bad_flags_give_one_line_errors(args, fragments):
    assert_clean_error(run_main(args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    # the bottom MLP must end in the embedding width for the dot interaction
    (["train", "--bottom-mlp", "13-32-7"], ["embedding dim 8", "13-32-7"]),
    # wrong number of dense features for the data
    (["train", "--bottom-mlp", "12-32-8"], ["13 dense features", "expects 12"]),
    (["train", "--preset", "paper-benchmark", "--data", "synthetic"], ["use --data random"]),
    # empty data
    (["train", "--train-examples", "100"], ["at least 1024"]),
    (["train", "--data", "random", "--eval-examples", "0"], ["--eval-examples", "positive integer"]),
    (["train", "--data", "/no/such/dataset"], ["/no/such/dataset"]),
    (["train", "--top-mlp", "32-2"], ["must end in 1"]),
])
def test_bad_configurations_give_one_line_errors(args, fragments):
    assert_clean_error(run_main(args), *fragments)


def test_output_directory_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_clean_error(run_main(["train", "--train-examples", "2048", "--eval-examples", "1024",
                                 "--out", str(blocker / "run")]), "cannot write to output directory")


def test_presets_command_prints_the_paper_shapes():
    proc = run_cli("presets")
    assert proc.returncode == 0
    assert "13-512-256-64-16" in proc.stdout and "512-256-1" in proc.stdout
    assert "1024-1024-1024-1" in proc.stdout
