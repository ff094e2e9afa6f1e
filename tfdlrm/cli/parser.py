"""The argument parser: every command and its flags (``python -m tfdlrm --help``)."""
from __future__ import annotations

import argparse

from tfdlrm.cli.args import (
    Parser,
    add_data_args,
    add_model_args,
    add_speed_args,
    add_training_args,
    bytes_arg,
    devices_arg,
    fraction,
    int_list,
    learning_rates,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
)
from tfdlrm.cli.commands import (
    cmd_bench_fit,
    cmd_bench_parallel,
    cmd_bench_pipeline,
    cmd_bench_serving,
    cmd_bench_train,
    cmd_cluster,
    cmd_compare,
    cmd_convert,
    cmd_export,
    cmd_generate,
    cmd_plan,
    cmd_presets,
    cmd_server,
    cmd_train,
)
from tfdlrm.presets import MODEL_NAMES, OPTIMIZER_NAMES, PRESET_NAMES


def add_torch_python(parser) -> None:
    parser.add_argument("--torch-python", metavar="PY",
                        help="the Python (with torch, numpy, scikit-learn, tqdm, tensorboard) that runs --reference")


def add_progress_flags(parser) -> None:
    """``--progress`` / ``--quiet``: the stderr progress line of generate and convert (default: on a terminal)."""
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None,
                          help="show the progress line even when stderr is not a terminal")
    progress.add_argument("--quiet", dest="progress", action="store_false", help="no progress line")


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a training run as a SavedModel for TF Serving (raw features in, probability out)",
        description="Export the last checkpoint (or --checkpoint) of a training run (the --out of train) as a "
                    "SavedModel in TF "
                    "Serving's layout, BASE/<version>/: signatures serving_default (raw dense counts and hex "
                    "categorical values), examples (serialized tf.Example), ids (mapped model inputs) and "
                    "transform, with the Criteo mapping inside the graph and warm-up requests in assets.extra. "
                    "See docs/serving.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (run.json, checkpoints/)")
    p.add_argument("--out", metavar="BASE", help="base directory of the versions (default: saved_models/<model>)")
    p.add_argument("--version", type=non_negative_int, help="version number (default: the next free one)")
    p.add_argument("--force", action="store_true", help="replace the version if it exists")
    p.add_argument("--checkpoint", default="latest", metavar="best|latest|epoch-N|step-N",
                   help="which checkpoint of the run: the newest (latest, the default), the best epoch on "
                        "validation (best), or one by name")
    p.add_argument("--dataset", metavar="DIR",
                   help="the converted dataset the run trained on, if it has moved since (its manifest must be "
                        "the one in run.json)")
    p.add_argument("--quantize-embeddings", type=int, choices=(8, 4), metavar="8|4",
                   help="store every embedding table row-wise quantized (uint8 codes, or two 4-bit codes a byte, "
                        "with a scale and bias per row), turned back into floats only for the rows a request "
                        "looks up (docs/memory.md)")
    p.set_defaults(func=cmd_export)


def add_bench_train_parser(benches) -> None:
    p = benches.add_parser(
        "train", help="training examples/s (kaggle preset, 26 x 1M tables, batch 2048) or the paper's benchmark",
        description="Train with model.fit on data already in memory (random ids; or --data tfrecord: a converted "
                    "Criteo dataset in a temporary directory) and print examples/s and ms per step (median of "
                    "--repeats runs after --warmup steps), CPU time per step and peak memory, with the machine, "
                    "date and load average. --preset paper-benchmark is the DLRM paper's single-socket benchmark "
                    "(also prints the projected time of its 1,000 batches). --suite runs every configuration of "
                    "docs/benchmarks.md, each in a fresh process.")
    p.add_argument("--model", default="dlrm", choices=MODEL_NAMES, help="model (default: dlrm)")
    p.add_argument("--data", default="memory", choices=("memory", "tfrecord"),
                   help="memory: random batches generated first, then repeated; tfrecord: Criteo rows converted "
                        "into a temporary directory and read as train --data DIR does (default: memory)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default: 2048)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZER_NAMES, help="optimizer (default: sgd)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default: 0.1)")
    p.add_argument("--warmup", type=positive_int, help="untimed steps first: tracing, XLA compilation "
                                                       "(default: 10; paper-benchmark 3)")
    p.add_argument("--steps", type=positive_int, help="steps per timed run (default: 20; paper-benchmark 5)")
    p.add_argument("--repeats", type=positive_int, help="timed runs; the median is reported (default: 5; "
                                                        "paper-benchmark 3)")
    p.add_argument("--distinct-batches", type=positive_int,
                   help="--data memory: batches generated before training and then repeated (default: 64; 16 "
                        "with bags of ids, as paper-benchmark)")
    add_speed_args(p)
    p.add_argument("--suite", action="store_true",
                   help="every configuration of docs/benchmarks.md (DLRM and DCN on kaggle, the paper's "
                        "benchmark, TFRecord data, and the stock step), each in a fresh process")
    p.add_argument("--profile", metavar="DIR", help="also profile 10 steps into DIR (TensorBoard) and print the "
                                                    "top ops per step")
    p.add_argument("--reference", metavar="DIR",
                   help="a checkout of facebookresearch/dlrm: --pairs times, this benchmark in a fresh process and "
                        "then the reference's own dlrm_s_pytorch.py --data-generation=random with the same tables, "
                        "MLPs and batch; medians and the ratio")
    add_torch_python(p)
    p.add_argument("--pairs", type=positive_int, default=3, help="--reference: runs of each side (default: 3)")
    p.add_argument("--tmp-dir", help="--data tfrecord: where the temporary directory goes (default: the system's)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    add_model_args(p, preset="kaggle")
    p.set_defaults(func=cmd_bench_train)


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="write raw Criteo-format rows (TSV) from the synthetic teacher, any size",
        description="Write raw rows as Criteo's logs hold them (label, 13 integer counts, 26 8-hex values; "
                    "some missing) from the synthetic teacher of --data synthetic, deterministic by --seed. "
                    "Kaggle: one file (gzip when it ends in .gz) that convert splits into 7 days; terabyte: "
                    "day_0 .. day_23 in the --out directory. A sidecar FILE.json (terabyte: "
                    "generated.json) records the teacher's exact AUC on the held-out day.")
    p.add_argument("--format", choices=("kaggle", "terabyte"), default="kaggle", help="layout (default: kaggle)")
    p.add_argument("--rows", type=positive_int, required=True, help="rows to write in all")
    p.add_argument("--out", required=True, help="kaggle: the file (FILE or FILE.gz); terabyte: a directory")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the world and the rows (default: 0)")
    p.add_argument("--table-rows", type=positive_int, default=100_000,
                   help="distinct ids per categorical feature in the world (default: 100000)")
    p.add_argument("--missing", type=fraction, default=0.05,
                   help="fraction of dense and categorical values left empty (default: 0.05)")
    p.add_argument("--gzip", action="store_true", help="terabyte: write day_N.gz")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    add_progress_flags(p)
    p.set_defaults(func=cmd_generate)


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert raw Criteo TSV, or your own CSV/TSV with --features, to a TFRecord dataset",
        description="Convert raw Criteo click logs (label, 13 integer and 26 hex features, tab-separated; "
                    "plain or gzip) into TFRecord shards and a manifest.json that train --data reads. "
                    "Either --input with --format (split into days as the DLRM paper) or --train/--test "
                    "(data already split).  With --features SPEC: your own CSV or TSV files with a header "
                    "(plain or gzip), columns as the feature spec (YAML or JSON) names them; see docs/data.md.")
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", metavar="FILE",
                   help="raw files split by days: Kaggle's train.txt (7 days by line count; days 1-6 train, "
                        "day 7 held out) or Terabyte's day_0 .. day_23 (day 23 held out)")
    g.add_argument("--format", choices=("kaggle", "terabyte"), default="kaggle",
                   help="which day split --input gets (default: kaggle)")
    g.add_argument("--features", metavar="SPEC",
                   help="your own features: a YAML or JSON feature spec (label, dense, categorical) for CSV/TSV "
                        "files with a header given by --train and --test")
    g.add_argument("--train", nargs="+", metavar="FILE", help="data already split: the training file(s)")
    g.add_argument("--val", nargs="+", metavar="FILE", help="data already split: validation file(s) (optional)")
    g.add_argument("--test", nargs="+", metavar="FILE", help="data already split: the held-out file(s)")
    g.add_argument("--halve-held-out", action="store_true",
                   help="split the held-out day into val (first half) and test (second half), as the reference")
    g.add_argument("--val-fraction", type=fraction, metavar="F",
                   help="data already split: hold out the last F of the --train lines as val")
    g = p.add_argument_group("mapping (pipelines/features.py)")
    mapping = g.add_mutually_exclusive_group()
    mapping.add_argument("--hash-buckets", type=positive_int,
                         help="categorical id = 1 + (value mod N); 0 = missing (the reference's max-ind-range)")
    mapping.add_argument("--min-frequency", type=positive_int,
                         help="vocabulary of the values seen at least T times in the training split; rarer "
                              "values share one id, missing has its own (default: T = 1)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="dataset directory to create (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--shuffle", action="store_true", help="shuffle the training split (bounded memory)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of --shuffle (default: 0)")
    g.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                   help="a malformed row stops the conversion with its file and line (error, the default) or "
                        "is counted and skipped (skip)")
    g.add_argument("--rows-per-shard", type=positive_int, default=1 << 20,
                   help="rows per TFRecord file (default: 1048576)")
    g.add_argument("--rows-per-block", type=positive_int, default=4096,
                   help="rows per TFRecord record (default: 4096)")
    g.add_argument("--workers", type=positive_int, default=2, help="parsing threads (default: 2)")
    add_progress_flags(g)
    p.set_defaults(func=cmd_convert)


def add_bench_parser(sub):
    p = sub.add_parser("bench", help="benchmarks that print figures: pipeline, train, parallel, serving",
                       description="Benchmarks that print figures.")
    benches = p.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=Parser, required=True)
    b = benches.add_parser(
        "pipeline", help="converter and tf.data reader throughput on a few million Criteo rows",
        description="Writes a raw Kaggle-format file (real rows from ../shared repeated, or generated rows), "
                    "converts it (vocabulary and hashing), then reads the training split as training does, "
                    "and prints rows/s. Everything happens in a temporary directory that is removed.")
    b.add_argument("--rows", type=positive_int, default=2_000_000, help="rows of raw data (default: 2000000)")
    b.add_argument("--source", help="raw Criteo file whose rows are repeated (default: ../shared "
                                    "kaggle_split/train.txt, else generated rows)")
    b.add_argument("--batch-sizes", type=int_list, default=[128, 1024, 4096],
                   help="reader batch sizes (default: 128,1024,4096)")
    b.add_argument("--repeats", type=positive_int, default=3, help="reader epochs per batch size; the median "
                                                                   "is reported (default: 3)")
    b.add_argument("--verbatim", action="store_true",
                   help="repeat the rows unchanged (default: each repetition permutes the digits 2-9 and the "
                        "letters a-f, so vocabularies grow with the rows)")
    b.add_argument("--train-steps", type=non_negative_int, default=0,
                   help="also train the kaggle-preset DLRM this many steps and report examples/s (default: 0)")
    b.add_argument("--train-batch-size", type=positive_int, default=128, help="batch size of --train-steps")
    b.add_argument("--workers", type=positive_int, default=2, help="converter parsing threads (default: 2)")
    b.add_argument("--tmp-dir", help="where the temporary directory goes (default: the system's)")
    b.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    b.set_defaults(func=cmd_bench_pipeline)

    b = benches.add_parser(
        "serving", help="latency at batch 1 and throughput at batch 1024 of an exported SavedModel",
        description="Load a SavedModel (an export of `python -m tfdlrm export`) and call one signature in this "
                    "process: latency of single-row requests (median, p99) and rows/s at --batch-size. Without "
                    "SAVED_MODEL, a freshly initialised model is exported into a temporary directory first.")
    b.add_argument("saved_model", nargs="?", metavar="SAVED_MODEL",
                   help="a version directory, or a base directory (its latest version)")
    b.add_argument("--signature", default="serving_default",
                   help="serving_default (default), examples or ids")
    b.add_argument("--requests", type=positive_int, default=2000, help="timed batch-1 requests (default: 2000)")
    b.add_argument("--batch-size", type=positive_int, default=1024, help="throughput batch size (default: 1024)")
    b.add_argument("--batches", type=positive_int, default=30, help="timed large batches (default: 30)")
    b.add_argument("--model", default="dlrm", choices=MODEL_NAMES,
                   help="without SAVED_MODEL: the model to export (default: dlrm)")
    b.add_argument("--preset", default="kaggle", choices=PRESET_NAMES,
                   help="without SAVED_MODEL: its preset (default: kaggle)")
    b.add_argument("--rows", type=positive_int, default=100_000,
                   help="without SAVED_MODEL: rows per table (default: 100000)")
    b.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    b.set_defaults(func=cmd_bench_serving)
    add_bench_train_parser(benches)
    b = benches.add_parser(
        "fit", help="train itself end to end (metrics.json's examples/s) at batch 128 and 2048, beside the reference",
        description="Run `train` (SGD, one epoch) in fresh processes with every default on (progress, "
                    "evaluations, checkpoints, TensorBoard) on generated rows or a converted dataset, and report "
                    "metrics.json's examples/s (median of --repeats, batch sizes interleaved), the command's wall "
                    "time and peak memory. With --reference and --torch-python, facebookresearch/dlrm's DLRM_Net "
                    "trains one epoch on the same rows right after each run, and the ratio is printed.")
    b.add_argument("--data", default="synthetic", metavar="DIR",
                   help="a converted dataset (convert --out DIR), or synthetic: rows generated while training "
                        "(default)")
    b.add_argument("--reference", metavar="DIR",
                   help="a checkout of facebookresearch/dlrm: run its DLRM_Net on the same rows after each run "
                        "(tfdlrm's runs then take its inputs: --dense-norm none, unless --train-args says otherwise)")
    add_torch_python(b)
    b.add_argument("--lr", type=positive_float, default=0.1, help="SGD learning rate, both sides (default: 0.1)")
    b.add_argument("--batch-sizes", type=int_list, default=[128, 2048], help="batch sizes (default: 128,2048)")
    b.add_argument("--repeats", type=positive_int, default=3, help="runs per batch size (default: 3)")
    b.add_argument("--model", default="dlrm", choices=MODEL_NAMES, help="model (default: dlrm)")
    b.add_argument("--preset", default="kaggle", choices=PRESET_NAMES, help="preset (default: kaggle)")
    b.add_argument("--rows", type=positive_int, help="rows per table (default: the preset's)")
    b.add_argument("--train-examples", type=positive_int,
                   help="--data synthetic: training rows of a run (default: 500000 below batch 1024, else 2000000)")
    b.add_argument("--train-args", default="", metavar="FLAGS",
                   help="more train flags, one quoted string (e.g. \"--steps-per-execution 1\")")
    b.add_argument("--tmp-dir", help="where the runs' directories go (default: the system's)")
    b.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    b.set_defaults(func=cmd_bench_fit)
    return benches


def build_parser() -> Parser:
    parser = Parser(prog="python -m tfdlrm", description="DLRM and the DCN baseline in TensorFlow (tf_keras).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train one model with model.fit and evaluate it on the held-out split",
                       description="Train DLRM, DCN or DCN-v2 with model.fit; checkpoints and TensorBoard logs "
                                   "go under --out; the final line is the exact held-out AUC.")
    p.add_argument("--model", default="dlrm", choices=MODEL_NAMES, help="model to train (default: dlrm)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZER_NAMES, help="optimizer (default: sgd)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default: 0.1)")
    p.add_argument("--seed", type=non_negative_int, default=1, help="seed of initialisation and shuffling (default: 1)")
    p.add_argument("--out", help="run directory: run.json, checkpoints/, logs/, metrics.json; an unfinished run "
                                 "there resumes, a finished one is not trained again")
    p.add_argument("--restart", action="store_true",
                   help="discard the run in --out (checkpoints, logs, results) and train from scratch")
    p.add_argument("--export", nargs="?", const="", metavar="BASE",
                   help="after training, export the run for TF Serving to BASE/<next version> (default BASE: "
                        "saved_models/<model>): its best epoch on validation where the data has a validation "
                        "split, else its last checkpoint; needs --out")
    p.add_argument("--verify-data", action="store_true",
                   help="a converted dataset: before training, check every shard's and vocabulary file's "
                        "sha256 against its manifest (default: the held-out shards only)")
    add_model_args(p)
    add_data_args(p)
    add_training_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several models on the same data and print a side-by-side table",
                       description="Train each model (for each optimizer and seed) on the same data, split, "
                                   "batch size and budget, then print exact held-out metrics side by side.")
    p.add_argument("--models", type=name_list(MODEL_NAMES), default=["dlrm", "dcn"],
                   help="comma-separated models (default: dlrm,dcn)")
    p.add_argument("--optimizers", type=name_list(OPTIMIZER_NAMES), default=["sgd"],
                   help="comma-separated optimizers (default: sgd)")
    p.add_argument("--lr", type=learning_rates, default=0.1,
                   help="learning rate, or one per optimizer: sgd=0.1,adagrad=0.02 (default: 0.1)")
    p.add_argument("--seeds", type=int_list, default=[1], help="comma-separated seeds (default: 1)")
    p.add_argument("--out", help="directory for report.json, report.md, curves.png and the per-model runs")
    p.add_argument("--retrain", "--restart", action="store_true",
                   help="train again, from scratch, runs whose results or checkpoints are already in --out "
                        "(default: reuse finished runs, resume unfinished ones)")
    p.add_argument("--export", nargs="?", const="", metavar="BASE",
                   help="export each model's best run for TF Serving to BASE/<model>/<version> "
                        "(default BASE: saved_models)")
    p.add_argument("--curve-points", type=non_negative_int, default=20,
                   help="points on each learning curve, each an exact held-out evaluation (default: 20; 0 = none)")
    p.add_argument("--mixed-inputs", action="store_true",
                   help="let the models of this comparison see differently treated inputs (--dense-norm "
                        "dlrm=none,dcn=standardize); refused without it, so that a comparison is like for like")
    p.add_argument("--curve-examples", type=non_negative_int, default=8192, metavar="N",
                   help="validation rows each curve point evaluates, the same first N at every point (default: "
                        "8192; 0 = the whole split); the epoch ends evaluate every row")
    add_model_args(p)
    add_data_args(p)
    add_training_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("plan", help="print where --parallel hybrid puts each embedding table",
                       description="The hybrid placement plan: each table on one device, bytes balanced "
                                   "greedily (largest first); tables over --budget split by rows.")
    p.add_argument("--model", default="dlrm", choices=MODEL_NAMES, help="model (default: dlrm)")
    p.add_argument("--devices", type=devices_arg, default=1, help="a device count or a list (default: 1)")
    p.add_argument("--budget", type=bytes_arg, help="embedding bytes per device (512MiB, 2GB, ...)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_model_args(p)
    p.set_defaults(func=cmd_plan)

    add_generate_parser(sub)
    add_convert_parser(sub)
    add_export_parser(sub)
    bench = add_bench_parser(sub)
    p = bench.add_parser("parallel", help="step time and bytes per device for 1, 2 and 4 devices",
                         description="Train a few steps on random data with --mode over each device count "
                                     "and report step time and embedding bytes per device. On a CPU the "
                                     "logical devices share its cores: a report, not a speed-up.")
    p.add_argument("--model", default="dlrm", choices=MODEL_NAMES, help="model (default: dlrm)")
    p.add_argument("--mode", default="hybrid", choices=("hybrid", "mirrored"), help="parallel mode (default: hybrid)")
    p.add_argument("--device-counts", type=int_list, default=[1, 2, 4], help="device counts (default: 1,2,4)")
    p.add_argument("--batch-size", type=positive_int, default=2048, help="global batch size (default: 2048)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per count (default: 20)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--budget", type=bytes_arg, help="hybrid: embedding bytes per device")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_args(p, preset="kaggle")
    p.set_defaults(func=cmd_bench_parallel, rows=100_000)

    p = sub.add_parser("server", help="run this host's worker or parameter server for --parallel ps",
                       description="Start the tf.distribute.Server of the task named in TF_CONFIG (a worker "
                                   "or ps) and serve until killed; the chief runs train --parallel ps.")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser(
        "cluster", help="a --parallel ps cluster on this host: servers, workers and the chief as processes",
        description="Start --ps parameter servers and --workers workers as separate processes on 127.0.0.1 "
                    "(free ports, inside a private network namespace so no port is reachable from outside "
                    "this host), run the chief's `train` given after --, stream the servers' output "
                    "prefixed with their names, and stop them all when the chief ends or on Ctrl-C. "
                    "Example: tfdlrm cluster --workers 2 --ps 2 -- train --steps-per-epoch 100 --epochs 2")
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes (default: 2)")
    p.add_argument("--ps", type=positive_int, default=2, help="parameter-server processes (default: 2)")
    p.add_argument("--memory-per-process", metavar="SIZE",
                   help="cap each process's private memory (RLIMIT_DATA), e.g. 3GiB (default: no cap)")
    p.add_argument("--open-ports", action="store_true",
                   help="where no private network namespace can be made, run anyway with the servers' ports "
                        "open on every interface (TensorFlow's servers authenticate no one)")
    p.add_argument("--ready-timeout", type=positive_int, default=300, metavar="S",
                   help="seconds the servers get to start (default: 300)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- train ARGS... (the chief's command)")
    p.set_defaults(func=cmd_cluster, parse_chief=lambda argv: build_parser().parse_args(argv))
    return parser
