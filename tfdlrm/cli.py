"""``python -m tfdlrm``: the command line.  It parses and reports; the work is in
functions of the package (``tfdlrm.training``, ``tfdlrm.compare``, ...), which tests
and the Python API call directly.

Errors the user can fix (flags, files, data) print one line, ``error: ...``, and
exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import tempfile
from typing import Callable, Optional, Sequence

from tfdlrm.errors import UserError
from tfdlrm.presets import PRESET_NAMES, parse_widths

MODEL_CHOICES = ("dlrm", "dcn", "dcn-v2")
OPTIMIZER_CHOICES = ("sgd", "adagrad", "adam")
PARALLEL_CHOICES = ("none", "hybrid", "mirrored", "ps")
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a process killed by it


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


# -- argument types: each rejects bad values with a readable reason ---------------------
def _int_at_least(low: int, wanted: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def widths(text: str) -> tuple[int, ...]:
    try:
        return parse_widths(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return names
    return parse


def devices_arg(text: str):
    from tfdlrm.parallel import parse_devices

    try:
        return parse_devices(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--devices: ").removeprefix("--devices ")) from None


def bytes_arg(text: str) -> int:
    from tfdlrm.parallel import parse_bytes

    try:
        return parse_bytes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--budget: ").removeprefix("--budget ")) from None


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
        if any(v < 0 for v in values):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


# -- shared option groups -----------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, preset: str = "tiny") -> None:
    g = p.add_argument_group("model (a preset, any field overridden by a flag)")
    g.add_argument("--preset", default=preset, choices=PRESET_NAMES, help=f"model shape preset (default: {preset})")
    g.add_argument("--rows", type=positive_int, help="rows of every embedding table (generated data; "
                   "a converted dataset's manifest sets its own)")
    g.add_argument("--embedding-dim", type=positive_int, help="embedding width")
    g.add_argument("--bottom-mlp", type=widths, help="bottom MLP in the paper's notation, input first: 13-512-256-64-16")
    g.add_argument("--top-mlp", type=widths, help="top MLP without its input width, ending in 1: 512-256-1")
    g.add_argument("--interaction", choices=("dot", "cat"), help="feature interaction (default: dot)")
    g.add_argument("--self-interaction", action="store_true", default=None,
                   help="include each vector's dot product with itself")
    g.add_argument("--pooling", choices=("sum", "mean"), help="multi-hot bag pooling (default: sum)")
    g.add_argument("--ids-per-lookup", type=positive_int, help="ids per categorical feature (random data)")
    g.add_argument("--cross-layers", type=non_negative_int, help="DCN cross layers (default: 6)")
    g.add_argument("--deep-mlp", type=widths, help="DCN deep network widths (default: 512-256)")
    g.add_argument("--cross-low-rank", type=positive_int, help="DCN-v2 low-rank projection size")


CONFIG_FLAGS = ("embedding_dim", "bottom_mlp", "top_mlp", "interaction", "self_interaction", "pooling",
                "ids_per_lookup", "cross_layers", "deep_mlp", "cross_low_rank")


def config_overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name, None) is not None}


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="random, synthetic (default), a converted Criteo dataset directory, or a raw Criteo "
                        "TSV file (plain or .gz; converted once into the cache, Kaggle's 7-day split unless "
                        "--eval-data is given)")
    g.add_argument("--eval-data", help="raw Criteo TSV: the held-out file, when raw data comes already split")
    g.add_argument("--cache-dir", help="raw Criteo TSV: where conversions are cached (default: $TFDLRM_CACHE, "
                                       "else ~/.cache/tfdlrm)")
    mapping = g.add_mutually_exclusive_group()
    mapping.add_argument("--hash-buckets", type=positive_int,
                         help="raw Criteo TSV: categorical ids by hashing into N buckets per feature")
    mapping.add_argument("--min-frequency", type=positive_int,
                         help="raw Criteo TSV: vocabulary of values seen at least T times (default: 1)")
    g.add_argument("--train-examples", type=positive_int, default=500_000,
                   help="generated data: rows in the training split (default: 500000)")
    g.add_argument("--eval-examples", type=positive_int, default=100_000,
                   help="generated data: rows in the held-out split (default: 100000)")
    g.add_argument("--data-seed", type=non_negative_int, default=0,
                   help="generated data: seed of the data set itself (default: 0)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=1, help="passes over the data (default: 1)")
    g.add_argument("--steps-per-epoch", type=positive_int, help="batches per epoch (default: the whole split)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default: 128)")
    g.add_argument("--eval-batch-size", type=positive_int, default=4096, help="evaluation batch size (default: 4096)")
    g.add_argument("--embedding-optimizer", choices=OPTIMIZER_CHOICES,
                   help="optimizer for the embedding tables (default: --optimizer)")
    g.add_argument("--embedding-lr", type=positive_float, help="learning rate of the embedding tables (default: --lr)")
    g = p.add_argument_group("fault tolerance (see README, Fault tolerance)")
    g.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="also checkpoint every N steps (default: only at each epoch end); rerunning the same "
                        "command resumes from the newest checkpoint")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic ops: the same seed gives bit-identical weights on this machine (slower)")
    add_speed_args(p)
    add_parallel_args(p)


XLA_CHOICES = ("auto", "sparse", "full", "off")
MIXED_PRECISION_CHOICES = ("auto", "bf16", "off")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (see docs/benchmarks.md)")
    g.add_argument("--xla", choices=XLA_CHOICES, default="auto",
                   help="one-device training step: sparse = embedding gathers and row updates compiled by XLA, "
                        "MLPs by TensorFlow/oneDNN; full = the whole step compiled; off = Keras's stock step "
                        "(default: auto = sparse on one device, off in parallel modes)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="auto",
                   help="bf16 = MLPs compute in bfloat16, weights and embedding tables stay float32; off = float32 "
                        "(default: auto = bf16 where the CPU has native bfloat16, avx512_bf16 or AMX)")
    g.add_argument("--huge-pages", choices=("auto", "off"), default="auto",
                   help="auto: on Linux with glibc 2.35+ and transparent huge pages in madvise mode, the command "
                        "restarts itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that the embedding "
                        "tables sit in 2 MiB pages (fewer TLB misses per looked-up row); off: leave memory as is")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (see README, Parallelism)")
    g.add_argument("--devices", type=devices_arg,
                   help="a device count (GPUs, or the CPU split into logical devices) or a list: GPU:0,GPU:1")
    g.add_argument("--parallel", choices=PARALLEL_CHOICES,
                   help="hybrid: tables placed per device, MLPs on every device; mirrored: everything "
                        "replicated; ps: parameter servers from TF_CONFIG (default: hybrid with several "
                        "devices, else none)")
    g.add_argument("--budget", type=bytes_arg,
                   help="hybrid: embedding bytes per device (512MiB, 2GB, ...); larger tables are split by rows")


def learning_rates(text: str) -> float | dict:
    """``0.1`` (every optimizer) or ``sgd=0.1,adagrad=0.02`` (one per optimizer)."""
    if "=" not in text:
        return positive_float(text)
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in OPTIMIZER_CHOICES:
            raise argparse.ArgumentTypeError(
                f"expected NUMBER or OPTIMIZER=NUMBER,... with optimizers {', '.join(OPTIMIZER_CHOICES)}; got {text!r}")
        rates[name] = positive_float(value)
    return rates


def spec_from_args(args: argparse.Namespace, model: str, seed: int, optimizer: str, out: Optional[str], **extra):
    from tfdlrm.compare import lr_for
    from tfdlrm.training import TrainSpec

    return TrainSpec(
        model=model, preset=args.preset, data=args.data, eval_data=args.eval_data, rows=args.rows,
        overrides=config_overrides(args), epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, optimizer=optimizer,
        lr=lr_for(optimizer, args.lr),
        embedding_optimizer=args.embedding_optimizer, embedding_lr=args.embedding_lr, seed=seed,
        data_seed=args.data_seed, train_examples=args.train_examples, eval_examples=args.eval_examples, out=out,
        devices=args.devices, parallel=args.parallel, budget=args.budget,
        cache_dir=args.cache_dir, hash_buckets=args.hash_buckets, min_frequency=args.min_frequency,
        checkpoint_every=args.checkpoint_every, deterministic=args.deterministic,
        xla=args.xla, mixed_precision=args.mixed_precision, **extra,
    )


# -- commands -----------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from tfdlrm.training import train

    export_base = None
    if args.export is not None:
        from tfdlrm.export import check_destination

        if not args.out:
            raise UserError("--export needs --out: it exports the run directory's last checkpoint")
        # Before training: an unwritable destination should not cost a training run.
        export_base, _ = check_destination(args.out, args.export or None, model_name=args.model)
    train(spec_from_args(args, args.model, args.seed, args.optimizer, args.out, restart=args.restart))
    if export_base is not None:
        from tfdlrm.export import export_run

        export_run(args.out, out=str(export_base), log=print)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tfdlrm.export import export_run

    export_run(args.run_dir, out=args.out, version=args.version, force=args.force, dataset=args.dataset, log=print)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tfdlrm.compare import compare, format_table

    specs = [spec_from_args(args, model, seed, optimizer, None, curve_points=args.curve_points)
             for optimizer in args.optimizers for model in args.models for seed in args.seeds]
    # The command that reproduces the report: --retrain/--restart only say how this run treated
    # earlier results, so they are left out.
    reproduce = [a for a in argv_of(args) if a not in ("--retrain", "--restart")]
    command = "python -m tfdlrm " + " ".join(shlex.quote(a) for a in reproduce)
    if args.export is not None and args.out is None:
        raise UserError("--export needs --out: the runs it exports are kept there")
    report = compare(specs, out=args.out, retrain=args.retrain, command=command)
    print()
    print(format_table(report))
    if args.export is not None:
        from tfdlrm.compare import export_best

        print()
        export_best(report, args.export or None)
    return 0


def progress_log(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a bench prints its progress: stderr under --json, so stdout holds only the JSON."""
    return (lambda s: print(s, file=sys.stderr)) if args.json else print


def argv_of(args: argparse.Namespace) -> list[str]:
    return getattr(args, "argv", None) or sys.argv[1:]


def cmd_presets(args: argparse.Namespace) -> int:
    from tfdlrm.presets import get_preset

    print(f"{'preset':16} {'dim':>4} {'tables':>6} {'rows/table':>11} {'ids':>4}  {'bottom MLP':22} top MLP")
    for name in PRESET_NAMES:
        c = get_preset(name)
        rows = c.table_rows[0] if len(set(c.table_rows)) == 1 else "varies"
        print(f"{name:16} {c.embedding_dim:>4} {c.num_tables:>6} {rows:>11} {c.ids_per_lookup:>4}  "
              f"{'-'.join(map(str, c.bottom_mlp)):22} {'-'.join(map(str, c.top_mlp))}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.parallel import plan_for
    from tfdlrm.presets import get_preset

    config = get_preset(args.preset, rows=args.rows, **config_overrides(args))
    plan = plan_for(config, args.devices, args.budget, args.model)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0


def cmd_bench_parallel(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.parallel import bench_parallel, format_bench

    rows = bench_parallel(args.preset, args.rows, args.device_counts, args.batch_size, args.steps, args.warmup,
                          args.mode, args.model, budget=args.budget, overrides=config_overrides(args),
                          log=(lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr)))
    if args.json:
        print(json.dumps([vars(r) for r in rows], indent=2))
    else:
        print(format_bench(rows))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from tfdlrm.parallel import run_server

    run_server()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pipelines.criteo import ConvertSpec, convert

    spec = ConvertSpec(
        out=args.out, inputs=args.input or (), format=args.format, train=args.train or (), val=args.val or (),
        test=args.test or (), hash_buckets=args.hash_buckets, min_frequency=args.min_frequency,
        halve_held_out=args.halve_held_out, shuffle=args.shuffle, seed=args.seed, on_bad_row=args.on_bad_row,
        rows_per_shard=args.rows_per_shard, rows_per_block=args.rows_per_block, overwrite=args.overwrite,
        workers=args.workers, progress=args.progress,
    )
    print(convert(spec).summary())
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    import json

    from pipelines.bench import bench_pipeline

    log = progress_log(args)
    result = bench_pipeline(rows=args.rows, source=args.source, batch_sizes=args.batch_sizes,
                            repeats=args.repeats, train_steps=args.train_steps,
                            train_batch_size=args.train_batch_size, workers=args.workers, verbatim=args.verbatim,
                            tmp_dir=args.tmp_dir, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_bench_serving(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.export import bench_serving, format_bench_serving

    log = progress_log(args)
    result = bench_serving(args.saved_model, signature=args.signature, requests=args.requests,
                           batch_size=args.batch_size, batches=args.batches, model=args.model, preset=args.preset,
                           rows=args.rows, log=log)
    print(json.dumps(result, indent=2) if args.json else format_bench_serving(result))
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a training run as a SavedModel for TF Serving (raw features in, probability out)",
        description="Export the last checkpoint of a training run (the --out of train) as a SavedModel in TF "
                    "Serving's layout, BASE/<version>/: signatures serving_default (raw dense counts and hex "
                    "categorical values), examples (serialized tf.Example), ids (mapped model inputs) and "
                    "transform, with the Criteo mapping inside the graph and warm-up requests in assets.extra. "
                    "See README, Serving.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (run.json, checkpoints/)")
    p.add_argument("--out", metavar="BASE", help="base directory of the versions (default: saved_models/<model>)")
    p.add_argument("--version", type=non_negative_int, help="version number (default: the next free one)")
    p.add_argument("--force", action="store_true", help="replace the version if it exists")
    p.add_argument("--dataset", metavar="DIR",
                   help="the converted dataset the run trained on, if it has moved since (its manifest must be "
                        "the one in run.json)")
    p.set_defaults(func=cmd_export)


def cmd_bench_train(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.benchmark import bench_train, format_suite, run_suite

    log = progress_log(args)
    if args.suite:
        extra = []
        for flag in ("batch_size", "steps", "repeats", "warmup"):
            if getattr(args, flag) is not None:
                extra += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.huge_pages == "off":
            extra += ["--huge-pages", "off"]
        results = run_suite(extra, log=log)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print()
            print(format_suite(results))
        return 1 if any("error" in r for r in results) else 0
    result = bench_train(model=args.model, preset=args.preset, rows=args.rows, data=args.data,
                         batch_size=args.batch_size or 2048, optimizer=args.optimizer, lr=args.lr,
                         warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                         distinct_batches=args.distinct_batches, xla=args.xla, mixed_precision=args.mixed_precision,
                         overrides=config_overrides(args), tmp_dir=args.tmp_dir, profile=args.profile, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def add_bench_train_parser(benches) -> None:
    p = benches.add_parser(
        "train", help="training examples/s (kaggle preset, 26 x 1M tables, batch 2048) or the paper's benchmark",
        description="Train with model.fit on data already in memory (random ids; or --data tfrecord: a converted "
                    "Criteo dataset in a temporary directory) and print examples/s and ms per step (median of "
                    "--repeats runs after --warmup steps), CPU time per step and peak memory, with the machine, "
                    "date and load average. --preset paper-benchmark is the DLRM paper's single-socket benchmark "
                    "(also prints the projected time of its 1,000 batches). --suite runs every configuration of "
                    "docs/benchmarks.md, each in a fresh process.")
    p.add_argument("--model", default="dlrm", choices=MODEL_CHOICES, help="model (default: dlrm)")
    p.add_argument("--data", default="memory", choices=("memory", "tfrecord"),
                   help="memory: random batches generated first, then repeated; tfrecord: Criteo rows converted "
                        "into a temporary directory and read as train --data DIR does (default: memory)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default: 2048)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZER_CHOICES, help="optimizer (default: sgd)")
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
    p.add_argument("--tmp-dir", help="--data tfrecord: where the temporary directory goes (default: the system's)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    add_model_args(p, preset="kaggle")
    p.set_defaults(func=cmd_bench_train)


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert raw Criteo TSV (plain or gzip) to a TFRecord dataset with a manifest",
        description="Convert raw Criteo click logs (label, 13 integer and 26 hex features, tab-separated; "
                    "plain or gzip) into TFRecord shards and a manifest.json that train --data reads. "
                    "Either --input with --format (split into days as the DLRM paper) or --train/--test "
                    "(data already split).")
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", metavar="FILE",
                   help="raw files split by days: Kaggle's train.txt (7 days by line count; days 1-6 train, "
                        "day 7 held out) or Terabyte's day_0 .. day_23 (day 23 held out)")
    g.add_argument("--format", choices=("kaggle", "terabyte"), default="kaggle",
                   help="which day split --input gets (default: kaggle)")
    g.add_argument("--train", nargs="+", metavar="FILE", help="data already split: the training file(s)")
    g.add_argument("--val", nargs="+", metavar="FILE", help="data already split: validation file(s) (optional)")
    g.add_argument("--test", nargs="+", metavar="FILE", help="data already split: the held-out file(s)")
    g.add_argument("--halve-held-out", action="store_true",
                   help="split the held-out day into val (first half) and test (second half), as the reference")
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
    progress = g.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None,
                          help="show the progress line even when stderr is not a terminal")
    progress.add_argument("--quiet", dest="progress", action="store_false", help="no progress line")
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
    b.add_argument("--model", default="dlrm", choices=MODEL_CHOICES,
                   help="without SAVED_MODEL: the model to export (default: dlrm)")
    b.add_argument("--preset", default="kaggle", choices=PRESET_NAMES,
                   help="without SAVED_MODEL: its preset (default: kaggle)")
    b.add_argument("--rows", type=positive_int, default=100_000,
                   help="without SAVED_MODEL: rows per table (default: 100000)")
    b.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    b.set_defaults(func=cmd_bench_serving)
    add_bench_train_parser(benches)
    return benches


def build_parser() -> Parser:
    parser = Parser(prog="python -m tfdlrm", description="DLRM and the DCN baseline in TensorFlow (tf_keras).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train one model with model.fit and evaluate it on the held-out split",
                       description="Train DLRM, DCN or DCN-v2 with model.fit; checkpoints and TensorBoard logs "
                                   "go under --out; the final line is the exact held-out AUC.")
    p.add_argument("--model", default="dlrm", choices=MODEL_CHOICES, help="model to train (default: dlrm)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZER_CHOICES, help="optimizer (default: sgd)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default: 0.1)")
    p.add_argument("--seed", type=non_negative_int, default=1, help="seed of initialisation and shuffling (default: 1)")
    p.add_argument("--out", help="run directory: run.json, checkpoints/, logs/, metrics.json; an unfinished run "
                                 "there resumes, a finished one is not trained again")
    p.add_argument("--restart", action="store_true",
                   help="discard the run in --out (checkpoints, logs, results) and train from scratch")
    p.add_argument("--export", nargs="?", const="", metavar="BASE",
                   help="after training, export the run for TF Serving to BASE/<next version> (default BASE: "
                        "saved_models/<model>); needs --out")
    add_model_args(p)
    add_data_args(p)
    add_training_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several models on the same data and print a side-by-side table",
                       description="Train each model (for each optimizer and seed) on the same data, split, "
                                   "batch size and budget, then print exact held-out metrics side by side.")
    p.add_argument("--models", type=name_list(MODEL_CHOICES), default=["dlrm", "dcn"],
                   help="comma-separated models (default: dlrm,dcn)")
    p.add_argument("--optimizers", type=name_list(OPTIMIZER_CHOICES), default=["sgd"],
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
    add_model_args(p)
    add_data_args(p)
    add_training_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("plan", help="print where --parallel hybrid puts each embedding table",
                       description="The hybrid placement plan: each table on one device, bytes balanced "
                                   "greedily (largest first); tables over --budget split by rows.")
    p.add_argument("--model", default="dlrm", choices=MODEL_CHOICES, help="model (default: dlrm)")
    p.add_argument("--devices", type=devices_arg, default=1, help="a device count or a list (default: 1)")
    p.add_argument("--budget", type=bytes_arg, help="embedding bytes per device (512MiB, 2GB, ...)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_model_args(p)
    p.set_defaults(func=cmd_plan)

    add_convert_parser(sub)
    add_export_parser(sub)
    bench = add_bench_parser(sub)
    p = bench.add_parser("parallel", help="step time and bytes per device for 1, 2 and 4 devices",
                         description="Train a few steps on random data with --mode over each device count "
                                     "and report step time and embedding bytes per device. On a CPU the "
                                     "logical devices share its cores: a report, not a speed-up.")
    p.add_argument("--model", default="dlrm", choices=MODEL_CHOICES, help="model (default: dlrm)")
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
    return parser


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native start-up chatter (oneDNN, CUDA probes) hidden.

    Those lines are written to file descriptor 2 by C++ before logging is set up,
    so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence them; they are replayed if the import
    fails.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tensorflow_error_message(error: BaseException) -> Optional[str]:
    """The readable part of a TensorFlow runtime error caused by bad data, or None."""
    message = getattr(error, "message", None) or str(error)
    marker = message.find("tfdlrm: ")
    if marker >= 0:
        text = message[marker + len("tfdlrm: "):]
        return text.split("\n")[0].rstrip("'\"]")
    return None


def os_error_message(error: OSError) -> str:
    """``PATH: No space left on device``, or the like, in one line."""
    from tfdlrm.errors import io_error_text

    text = io_error_text(error)
    return text if error.filename is not None else f"cannot read or write: {text}"


class StdoutError(OSError):
    """Writing to standard output failed (a full disk, a closed pipe)."""


class _GuardedStdout:
    """``sys.stdout`` while a command runs: its write errors become :class:`StdoutError`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _quiet_stdout(stream):
    """After stdout failed, a stand-in for it, so that the interpreter's last flush stays silent
    (the one line already said what happened)."""
    if stream is sys.__stdout__:
        try:
            return open(os.devnull, "w")
        except OSError:
            pass
    return stream


def main(argv: Optional[Sequence[str]] = None, restart: bool = False) -> int:
    """Run a command.  ``restart`` (``python -m tfdlrm`` sets it): a command with
    ``--huge-pages auto`` may first restart the process with huge pages on, and one
    with ``--huge-pages off`` without them (``tfdlrm._env``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if restart and getattr(args, "huge_pages", None) in ("auto", "off"):
        from tfdlrm import _env

        if args.huge_pages == "auto":
            _env.restart_with_huge_pages(args.argv)
        else:
            _env.restart_without_huge_pages(args.argv)
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        if args.command != "presets":
            import_tensorflow_quietly()
        code = args.func(args)
        sys.stdout.flush()  # here, so that a full disk or a closed pipe is one line like any error
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except StdoutError as e:
        stdout = _quiet_stdout(stdout)
        if e.errno == errno.EPIPE:  # the reader went away (`| head`): stop quietly, as SIGPIPE would
            return EXIT_BROKEN_PIPE
        sys.stderr.write(f"error: cannot write to standard output: {e.strerror or e}\n")
        return EXIT_USAGE
    except OSError as e:  # files: missing, unreadable, not writable, disk full
        sys.stderr.write(f"error: {os_error_message(e)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:  # TensorFlow reports bad data as runtime errors
        text = tensorflow_error_message(e)
        if text is None:
            raise
        sys.stderr.write(f"error: {text}\n")
        return EXIT_USAGE
    finally:
        sys.stdout = stdout
    return code
