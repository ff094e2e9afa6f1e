"""Bad input, every command: missing or unreadable files, an output directory that cannot be
written, a full disk, flags out of range, mismatched presets and runs, empty data.

Each row must give one line ``error: ...`` naming the problem, a non-zero exit status,
no traceback, and leave no output that looks complete.  Most rows run ``main`` in this
process (an exception escaping it would be a traceback on the command line); rows that
need a file-size limit or stdout on a full device run a fresh process.
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main, run_process
from tests.helpers.criteo_rows import numbered_lines, write_lines

KAGGLE_LINES = 140  # 7 days of 20 rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Files every row can name: good and bad inputs, a converted dataset, finished runs."""
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    root = tmp_path_factory.mktemp("assets")
    a = {"root": root}
    a["empty"] = root / "empty.txt"
    a["empty"].write_text("")
    a["file"] = root / "a-file"
    a["file"].write_text("not a directory\n")
    a["dir"] = root / "a-dir"
    a["dir"].mkdir()
    a["spec"] = root / "spec.yaml"
    a["spec"].write_text("label: clicked\ndense: [age]\ncategorical: [country]\n")
    a["raw"] = write_lines(root / "train.txt", numbered_lines(KAGGLE_LINES))
    a["held_out"] = write_lines(root / "test.txt", numbered_lines(40, start=KAGGLE_LINES))
    lines = numbered_lines(30)
    lines[17] = lines[17].replace("\t", "\tx", 1)  # I1 is not an integer
    a["bad_rows"] = write_lines(root / "bad_rows.txt", lines)
    a["dataset"] = root / "dataset"
    convert(ConvertSpec(out=str(a["dataset"]), train=[str(a["raw"])], test=[str(a["held_out"])],
                        rows_per_block=16, hash_buckets=100, progress=False), log=lambda s: None)
    a["bad_manifest"] = root / "bad_manifest"
    shutil.copytree(a["dataset"], a["bad_manifest"])
    (a["bad_manifest"] / "manifest.json").write_text('{"format": "tfdlrm.criteo", "schema_vers')
    a["truncated"] = root / "truncated"
    shutil.copytree(a["dataset"], a["truncated"])
    shard = a["truncated"] / "train-00000.tfrecord"
    shard.write_bytes(shard.read_bytes()[:100])
    # a finished tiny run (Keras's stock step: no XLA compile), a run directory with no checkpoint, and one
    # whose run.json is garbage
    a["run"] = root / "run"
    proc = run_main(["train", "--train-examples", "2048", "--eval-examples", "1024", "--batch-size", "512",
                     "--optimizer", "adagrad", "--lr", "0.05", "--xla", "off", "--out", str(a["run"])])
    assert proc.returncode == 0, proc.stderr
    # a stand-in for a checkout of facebookresearch/dlrm, and a Python without PyTorch (this one)
    a["checkout"] = root / "dlrm-checkout"
    a["checkout"].mkdir()
    (a["checkout"] / "dlrm_s_pytorch.py").write_text("import torch\n")
    a["python"] = sys.executable
    a["bare_run"] = root / "bare_run"
    a["bare_run"].mkdir()
    shutil.copy(a["run"] / "run.json", a["bare_run"] / "run.json")
    a["broken_run"] = root / "broken_run"
    shutil.copytree(a["run"], a["broken_run"])
    (a["broken_run"] / "metrics.json").unlink()
    (a["broken_run"] / "run.json").write_text("{garbage")
    return a


TINY = ["--train-examples", "2048", "--eval-examples", "1024", "--batch-size", "512"]
RUN = [*TINY, "--optimizer", "adagrad", "--lr", "0.05", "--out", "{run}"]  # the finished run in assets
CONVERT = ["convert", "--train", "{raw}", "--test", "{held_out}"]
PS_CONFIG = {"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}, '
                          '"task": {"type": "worker", "index": 3}}'}

# (id, argv, fragments of the one error line, options)
#   options: process (a fresh process), max_file_bytes (RLIMIT_FSIZE), stdout (a path), env,
#            absent (globs under the row's tmp dir that must not exist afterwards), command (skip
#            unless python -m tfdlrm has it)
ROWS = [
    # -- train: files
    ("train/data-missing", ["train", "--data", "{tmp}/no-such-dataset"], ["no-such-dataset", "no such file"], {}),
    ("train/data-empty-file", ["train", "--data", "{empty}"], ["is empty"], {}),
    ("train/data-not-a-dataset", ["train", "--data", "{dir}"], ["manifest.json not found"], {}),
    ("train/data-manifest-unreadable", ["train", "--data", "{bad_manifest}"], ["manifest.json is unreadable"], {}),
    ("train/data-shard-truncated", ["train", "--data", "{truncated}"], ["is damaged", "train-00000.tfrecord"], {}),
    ("train/data-bad-row", ["train", "--data", "{bad_rows}", "--eval-data", "{held_out}", "--cache-dir",
                            "{tmp}/cache"], ["bad_rows.txt line 18", "not an integer"], {"absent": ["cache/criteo/*"]}),
    ("train/eval-data-missing", ["train", "--data", "{raw}", "--eval-data", "{tmp}/none.txt"],
     ["--eval-data file not found"], {}),
    ("train/val-data-missing", ["train", "--data", "{raw}", "--eval-data", "{held_out}", "--val-data",
                                "{tmp}/none.txt"], ["--val-data file not found"], {}),
    ("train/val-fraction-out-of-range", ["train", "--data", "{raw}", "--eval-data", "{held_out}", "--val-fraction",
                                         "1.5"], ["--val-fraction", "between 0 and 1"], {}),
    ("train/val-fraction-without-eval-data", ["train", "--data", "{raw}", "--val-fraction", "0.1", "--cache-dir",
                                              "{tmp}/cache"], ["--val-fraction need --eval-data"], {}),
    ("train/val-fraction-generated", ["train", "--val-fraction", "0.1"], ["--val-fraction", "raw Criteo TSV"], {}),
    ("train/shuffle-unknown", ["train", "--shuffle", "sometimes"], ["--shuffle", "invalid choice"], {}),
    ("train/qr-collisions-one", ["train", "--qr-collisions", "1"], ["--qr-collisions must be at least 2"], {}),
    ("train/qr-concat-bottom-width", ["train", "--qr-collisions", "4", "--qr-operation", "concat"],
     ["2 x the embedding dim", "bottom MLP to end in 16"], {}),
    ("train/memory-budget-too-small", ["train", "--preset", "kaggle", "--memory-budget", "1M"],
     ["--memory-budget 1,048,576 bytes cannot hold the tables"], {}),
    ("train/md-temperature-out-of-range", ["train", "--md-temperature", "1.5"], ["--md-temperature must be in (0, 1]"],
     {}),
    # -- train: output
    ("train/out-under-a-file", ["train", *TINY, "--out", "{file}/run"], ["cannot write to output directory"], {}),
    ("train/out-is-a-file", ["train", *TINY, "--out", "{file}"], ["cannot write to output directory", "a-file"], {}),
    ("train/cache-dir-not-writable", ["train", "--data", "{raw}", "--cache-dir", "{file}/cache"],
     ["cannot create the cache directory"], {}),
    ("train/out-read-only-fs", ["train", *TINY, "--out", "/proc/tfdlrm-run"],
     ["cannot write to output directory /proc/tfdlrm-run"], {}),
    ("train/disk-full", ["train", *TINY, "--out", "{tmp}/run"], ["cannot write checkpoint", "File too large"],
     {"process": True, "max_file_bytes": 300_000,
      "absent": ["run/metrics.json", "run/checkpoints/*.json", "run/checkpoints/checkpoint"]}),
    # -- train: flags
    ("train/epochs-zero", ["train", "--epochs", "0"], ["--epochs", "positive integer"], {}),
    ("train/lr-infinite", ["train", "--lr", "inf"], ["--lr", "positive finite"], {}),
    ("train/batch-size-negative", ["train", "--batch-size", "-5"], ["--batch-size", "'-5'"], {}),
    ("train/checkpoint-every-zero", ["train", "--checkpoint-every", "0"], ["--checkpoint-every", "positive"], {}),
    ("train/checkpoint-every-without-out", ["train", "--checkpoint-every", "10"],
     ["--checkpoint-every needs --out"], {}),
    ("train/checkpoint-every-with-ps", ["train", "--parallel", "ps", "--steps-per-epoch", "5", "--checkpoint-every",
                                        "2", "--out", "{tmp}/ps"], ["--checkpoint-every", "--parallel ps"], {}),
    ("train/tf-config-not-json", ["train", "--parallel", "ps", "--steps-per-epoch", "5"],
     ["TF_CONFIG is not valid JSON"], {"env": {"TF_CONFIG": "{cluster"}}),
    # -- train: presets and runs that do not match
    ("train/preset-vs-synthetic", ["train", "--preset", "paper-benchmark"], ["use --data random"], {}),
    ("train/mlp-vs-dim", ["train", "--bottom-mlp", "13-32-7"], ["embedding dim 8", "13-32-7"], {}),
    ("train/preset-vs-criteo", ["train", "--preset", "paper-benchmark", "--data", "{dataset}"],
     ["13 dense features", "expects 512"], {}),
    ("train/resume-other-preset", ["train", *RUN, "--preset", "kaggle", "--rows", "1000"],
     ["holds a run with other settings", "preset: tiny != kaggle", "--restart"], {}),
    ("train/resume-other-table-sizes", ["train", *RUN, "--rows", "999"], ["table_rows differ", "1000 != 999"], {}),
    ("train/resume-other-model", ["train", *RUN, "--model", "dcn"], ["model: dlrm != dcn"], {}),
    ("train/resume-other-optimizer", ["train", *TINY, "--optimizer", "sgd", "--lr", "0.05", "--out", "{run}"],
     ["optimizer: 'adagrad' != 'sgd'"], {}),
    ("train/resume-other-steps-per-epoch", ["train", *RUN, "--steps-per-epoch", "1"],
     ["steps_per_epoch: None != 1"], {}),
    ("train/run-json-unreadable", ["train", *TINY, "--out", "{broken_run}"], ["run.json is unreadable", "--restart"],
     {}),
    # -- train: empty data
    ("train/empty-synthetic-split", ["train", "--train-examples", "100"], ["at least 1024"], {}),
    ("train/empty-eval-split", ["train", "--data", "random", "--eval-examples", "0"], ["--eval-examples"], {}),

    # -- compare
    ("compare/model-unknown", ["compare", "--models", "dlrm,wide"], ["--models", "dlrm, dcn, dcn-v2"], {}),
    ("compare/lr-for-missing-optimizer", ["compare", "--lr", "adagrad=0.1"],
     ["no learning rate given for optimizer 'sgd'"], {}),
    ("compare/seeds-negative", ["compare", "--seeds", "1,-2"], ["--seeds", "integers >= 0"], {}),
    ("compare/curve-points-negative", ["compare", "--curve-points", "-1"], ["--curve-points"], {}),
    ("compare/data-missing", ["compare", "--data", "{tmp}/missing"], ["missing"], {}),
    ("compare/out-under-a-file", ["compare", "--models", "dlrm", *TINY, "--out", "{file}/cmp"],
     ["cannot write to output directory"], {}),
    ("compare/checkpoint-every-without-out", ["compare", "--models", "dlrm", *TINY, "--checkpoint-every", "3"],
     ["--checkpoint-every needs --out"], {}),
    ("compare/disk-full", ["compare", "--models", "dlrm", *TINY, "--curve-points", "0", "--out", "{tmp}/cmp"],
     ["File too large"], {"process": True, "max_file_bytes": 1024,
                          "absent": ["cmp/report.json", "cmp/report.md", "cmp/runs/*/metrics.json"]}),

    # -- convert
    ("convert/features-spec-missing", ["convert", "--features", "{tmp}/none.yaml", "--train", "{raw}", "--out",
                                       "{tmp}/out"], ["cannot read the feature spec"], {"absent": ["out"]}),
    ("convert/features-spec-empty", ["convert", "--features", "{empty}", "--train", "{raw}", "--out", "{tmp}/out"],
     ["must be a mapping with label, dense and categorical"], {"absent": ["out"]}),
    ("convert/features-no-header-columns", ["convert", "--features", "{spec}", "--train", "{raw}", "--out",
                                            "{tmp}/out"], ["has no column(s) clicked, age"], {"absent": ["out"]}),
    # -- generate
    ("generate/rows-too-few", ["generate", "--rows", "3", "--out", "{tmp}/g.txt"], ["--rows must be at least 7"],
     {"absent": ["g.txt"]}),
    ("generate/out-exists", ["generate", "--rows", "100", "--out", "{file}"], ["exists (use --overwrite"], {}),
    ("generate/out-under-a-file", ["generate", "--rows", "100", "--out", "{file}/g.txt"],
     ["cannot create the directory"], {}),
    ("convert/input-missing", ["convert", "--input", "{tmp}/day.txt", "--out", "{tmp}/out"],
     ["input file not found"], {"absent": ["out"]}),
    ("convert/val-fraction-with-input", ["convert", "--input", "{raw}", "--val-fraction", "0.2", "--out",
                                         "{tmp}/out"], ["--val-fraction holds out part of --train"], {"absent": ["out"]}),
    ("convert/val-fraction-and-val", [*CONVERT, "--val", "{held_out}", "--val-fraction", "0.2", "--out", "{tmp}/out"],
     ["either --val FILES or --val-fraction"], {"absent": ["out"]}),
    ("convert/input-empty", ["convert", "--input", "{empty}", "--out", "{tmp}/out"], ["is empty"], {"absent": ["out"]}),
    ("convert/input-a-directory", ["convert", "--input", "{dir}", "--out", "{tmp}/out"], ["is a directory"],
     {"absent": ["out"]}),
    ("convert/input-bad-row", ["convert", "--train", "{bad_rows}", "--test", "{held_out}", "--out", "{tmp}/out"],
     ["bad_rows.txt line 18", "--on-bad-row skip"], {"absent": ["out", ".out.partial-*"]}),
    ("convert/terabyte-name", ["convert", "--input", "{raw}", "--format", "terabyte", "--out", "{tmp}/out"],
     ["day_0 .. day_23"], {}),
    ("convert/out-under-a-file", [*CONVERT, "--out", "{file}/out"], ["cannot create the output directory"], {}),
    ("convert/out-not-empty", [*CONVERT, "--out", "{dataset}"], ["already exists and is not empty"], {}),
    ("convert/rows-per-block-zero", [*CONVERT, "--out", "{tmp}/out", "--rows-per-block", "0"],
     ["--rows-per-block", "positive"], {}),
    ("convert/disk-full", [*CONVERT, "--hash-buckets", "100", "--rows-per-block", "16", "--out", "{tmp}/out"],
     ["cannot convert into", "File too large", "nothing was written"],
     {"process": True, "max_file_bytes": 4096, "absent": ["out", ".out.partial-*"]}),
    ("convert/disk-full-vocabulary", [*CONVERT, "--out", "{tmp}/out"], ["File too large"],
     {"process": True, "max_file_bytes": 4096, "absent": ["out", ".out.partial-*"]}),

    # -- bench pipeline
    ("bench-pipeline/source-missing", ["bench", "pipeline", "--source", "{tmp}/nope.txt"],
     ["--source file not found"], {}),
    ("bench-pipeline/source-empty", ["bench", "pipeline", "--source", "{empty}", "--rows", "100"],
     ["has no lines"], {}),
    ("bench-pipeline/rows-too-few", ["bench", "pipeline", "--rows", "5"], ["at least 14"], {}),
    ("bench-pipeline/tmp-dir-not-a-directory", ["bench", "pipeline", "--rows", "100", "--tmp-dir", "{file}"],
     ["cannot create a temporary directory"], {}),
    ("bench-pipeline/batch-size-zero", ["bench", "pipeline", "--source", "{raw}", "--rows", "140", "--batch-sizes",
                                        "0", "--repeats", "1", "--tmp-dir", "{tmp}"],
     ["batch size must be positive"], {"absent": ["tfdlrm-bench-*"]}),
    ("bench-pipeline/disk-full", ["bench", "pipeline", "--source", "{raw}", "--rows", "5000", "--tmp-dir", "{tmp}"],
     ["cannot write the raw rows", "File too large"],
     {"process": True, "max_file_bytes": 20_000, "absent": ["tfdlrm-bench-*"]}),

    # -- bench train (issue 7) and bench serving (issue 5): these run once the benchmarks exist
    ("bench-train/steps-zero", ["bench", "train", "--steps", "0"], ["--steps", "positive"],
     {"command": ("bench", "train")}),
    ("bench-train/data-unknown", ["bench", "train", "--data", "{tmp}/nowhere"], ["--data"],
     {"command": ("bench", "train")}),
    ("bench-serving/saved-model-missing", ["bench", "serving", "{tmp}/no-saved-model"], ["no-saved-model"],
     {"command": ("bench", "serving")}),
    ("bench-serving/requests-zero", ["bench", "serving", "--requests", "0"], ["--requests", "positive"],
     {"command": ("bench", "serving")}),

    ("bench-fit/repeats-zero", ["bench", "fit", "--repeats", "0"], ["--repeats", "positive"],
     {"command": ("bench", "fit")}),
    ("bench-fit/train-fails", ["bench", "fit", "--batch-sizes", "128", "--repeats", "1", "--train-examples", "10",
                               "--tmp-dir", "{tmp}"],
     ["bench fit", "failed (exit 2)", "train examples must be at least 1024"], {"absent": ["tfdlrm-bench-fit-*"]}),
    ("bench-fit/reference-alone", ["bench", "fit", "--reference", "{dir}"], ["--reference and --torch-python go together"],
     {"command": ("bench", "fit")}),
    ("bench-fit/reference-not-a-checkout", ["bench", "fit", "--repeats", "1", "--batch-sizes", "128",
                                            "--reference", "{dir}", "--torch-python",
                                            "{file}", "--tmp-dir", "{tmp}"],
     ["--reference", "no dlrm_s_pytorch.py there"], {"absent": ["tfdlrm-bench-fit-*"]}),
    ("bench-fit/reference-python-without-torch", ["bench", "fit", "--repeats", "1", "--batch-sizes", "128",
                                                  "--reference", "{checkout}",
                                                  "--torch-python", "{python}", "--tmp-dir", "{tmp}"],
     ["cannot import the reference's dlrm_s_pytorch.py", "No module named"], {"absent": ["tfdlrm-bench-fit-*"]}),
    ("bench-fit/examples-with-a-dataset", ["bench", "fit", "--data", "{dataset}", "--train-examples", "2048"],
     ["--train-examples and --rows are for --data synthetic"], {}),
    ("bench-train/reference-wrong-model", ["bench", "train", "--model", "dcn", "--reference", "{checkout}",
                                           "--torch-python", "{python}"], ["--reference", "--model dlrm"],
     {"command": ("bench", "train")}),
    ("bench-train/reference-with-adagrad", ["bench", "train", "--optimizer", "adagrad", "--reference", "{checkout}",
                                            "--torch-python", "{python}"], ["--reference", "--optimizer sgd"],
     {"command": ("bench", "train")}),
    # an abbreviated flag would survive the child command's removal of --reference: refused
    ("bench-train/abbreviated-reference", ["bench", "train", "--ref", "{checkout}", "--torch-python", "{python}"],
     ["unrecognized arguments: --ref"], {"command": ("bench", "train")}),
    ("bench-fit/reference-with-two-synthetic-sizes", ["bench", "fit", "--reference", "{checkout}", "--torch-python",
                                                      "{python}", "--tmp-dir", "{tmp}"],
     ["--reference with --data synthetic: give --train-examples"], {"absent": ["tfdlrm-bench-fit-*"]}),

    # -- bench parallel
    ("bench-parallel/device-counts-zero", ["bench", "parallel", "--device-counts", "0"], ["device counts"], {}),
    ("bench-parallel/steps-zero", ["bench", "parallel", "--steps", "0"], ["--steps", "positive"], {}),
    ("bench-parallel/mode-unknown", ["bench", "parallel", "--mode", "ps"], ["--mode", "invalid choice"], {}),
    ("bench-parallel/budget-too-small", ["bench", "parallel", "--device-counts", "1", "--budget", "1KB"],
     ["cannot place table", "raise --budget"], {}),

    # -- plan
    ("plan/devices-zero", ["plan", "--devices", "0"], ["--devices", "positive device count"], {}),
    ("plan/budget-garbage", ["plan", "--budget", "lots"], ["--budget", "'lots'"], {}),
    ("plan/budget-too-small", ["plan", "--budget", "1KB"], ["cannot place table C1"], {}),
    ("plan/mlp-vs-dim", ["plan", "--bottom-mlp", "13-32-7"], ["embedding dim 8"], {}),
    ("plan/stdout-full", ["plan", "--preset", "kaggle", "--devices", "2", "--json"],
     ["cannot write to standard output", "No space left on device"], {"process": True, "stdout": "/dev/full"}),

    # -- presets
    ("presets/extra-argument", ["presets", "--all"], ["unrecognized arguments"], {}),
    ("presets/stdout-full", ["presets"], ["cannot write to standard output", "No space left on device"],
     {"process": True, "stdout": "/dev/full"}),

    # -- server
    ("server/no-tf-config", ["server"], ["needs TF_CONFIG"], {"env": {"TF_CONFIG": ""}}),
    ("server/tf-config-not-json", ["server"], ["TF_CONFIG is not valid JSON"], {"env": {"TF_CONFIG": "{cluster"}}),
    ("server/task-index-outside-job", ["server"], ["task index 3", "'worker' job (1 task(s))"], {"env": PS_CONFIG}),
    ("server/chief-task", ["server"], ["runs a 'worker' or 'ps' task", "'chief'"],
     {"env": {"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"], "chief": ["127.0.0.1:3"]}, '
                           '"task": {"type": "chief", "index": 0}}'}}),

    # -- cluster (tfdlrm/parallel/cluster.py): refused before any process starts
    ("cluster/no-command", ["cluster"], ["-- train ARGS", "nothing"], {"env": {"TF_CONFIG": ""}}),
    ("cluster/not-train", ["cluster", "--", "export", "{run}"], ["-- train ARGS", "'export"], {"env": {"TF_CONFIG": ""}}),
    ("cluster/tf-config-set", ["cluster", "--", "train", "--steps-per-epoch", "2"], ["unset TF_CONFIG"],
     {"env": PS_CONFIG}),
    ("cluster/memory-size", ["cluster", "--memory-per-process", "3XB", "--", "train", "--steps-per-epoch", "2"],
     ["--memory-per-process", "'3XB'"], {"env": {"TF_CONFIG": ""}}),

    # -- export (tfdlrm/export.py, issue 5): these run once the command exists
    ("export/run-missing", ["export", "{tmp}/no-run"], ["no-run"], {"command": ("export",)}),
    ("export/run-is-a-file", ["export", "{file}"], ["a-file"], {"command": ("export",)}),
    ("export/run-without-checkpoint", ["export", "{bare_run}"], ["checkpoint"], {"command": ("export",)}),
    ("export/out-under-a-file", ["export", "{run}", "--out", "{file}/models"], ["a-file"], {"command": ("export",)}),
    ("export/version-negative", ["export", "{run}", "--version", "-1"], ["--version"], {"command": ("export",)}),
    ("export/quantize-bits", ["export", "{run}", "--quantize-embeddings", "3"], ["--quantize-embeddings", "invalid choice"],
     {"command": ("export",)}),
]


@functools.lru_cache(maxsize=None)
def commands(*parents: str) -> frozenset:
    """The (sub)commands ``python -m tfdlrm PARENTS --help`` lists (the same parser, in this process)."""
    import re

    text = run_main([*parents, "--help"]).stdout
    block = text.split("positional arguments:", 1)[-1].split("options:", 1)[0]
    return frozenset(re.findall(r"^    (\w[\w-]*)", block, re.MULTILINE))


@pytest.mark.parametrize("argv, fragments, options", [
    pytest.param(*row[1:], id=row[0], marks=[pytest.mark.slow] if row[3].get("process") else []) for row in ROWS])
def test_bad_input_gives_one_line_and_no_complete_looking_output(argv, fragments, options, assets, tmp_path,
                                                                 monkeypatch):
    command = options.get("command")
    if command and command[-1] not in commands(*command[:-1]):
        pytest.skip(f"python -m tfdlrm has no {' '.join(command)} command yet")
    names = {k: str(v) for k, v in assets.items()}
    argv = [part.format(tmp=tmp_path, **names) for part in argv]
    fragments = [f.format(tmp=tmp_path, **names) for f in fragments]
    if options.get("process"):
        proc = run_process(argv, max_file_bytes=options.get("max_file_bytes"), stdout_path=options.get("stdout"),
                           env=options.get("env"))
        assert "Traceback" not in proc.stdout
    else:
        for key, value in options.get("env", {}).items():
            monkeypatch.setenv(key, value)
        proc = run_main(argv)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert_clean_error(proc, *fragments)
    for pattern in options.get("absent", []):
        assert not list(tmp_path.glob(pattern)), (pattern, sorted(p.name for p in tmp_path.iterdir()))


def test_the_table_covers_every_command():
    """A command added later needs rows here."""
    listed = {(c,) for c in commands()} | {("bench", c) for c in commands("bench")}
    covered = {tuple(row[1][:1]) for row in ROWS} | {tuple(row[1][:2]) for row in ROWS if row[1][0] == "bench"}
    assert listed <= covered, sorted(listed - covered)


def test_a_finished_run_is_reported_and_exits_zero(assets):
    proc = run_main(["train", *[part.format(run=assets["run"]) for part in RUN]])
    assert proc.returncode == 0, proc.stderr
    assert "finished earlier" in proc.stdout and "Epoch" not in proc.stdout
    metrics = json.loads((Path(assets["run"]) / "metrics.json").read_text())
    assert f"{metrics['evaluation']['auc']:.4f}" in proc.stdout
