"""One function per command: turn parsed flags into a call, and report."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, Optional

from tfdlrm.cli.args import config_overrides
from tfdlrm.errors import UserError
from tfdlrm.presets import PRESET_NAMES


def spec_from_args(args: argparse.Namespace, model: str, seed: int, optimizer: str, out: Optional[str],
                   per_model: bool = False, **extra):
    """A TrainSpec from the command line; ``per_model``: compare's, where flags may name values per model."""
    from tfdlrm.compare import lr_for
    from tfdlrm.training.spec import TrainSpec

    return TrainSpec(
        model=model, preset=args.preset, data=args.data, eval_data=args.eval_data, rows=args.rows,
        val_data=args.val_data, val_fraction=args.val_fraction, shuffle=args.shuffle, last_batch=args.last_batch,
        overrides=config_overrides(args, model if per_model else None), epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, optimizer=optimizer,
        lr=lr_for(optimizer, args.lr),
        embedding_optimizer=args.embedding_optimizer, embedding_lr=args.embedding_lr, seed=seed,
        warmup_steps=args.warmup_steps, decay_start_step=args.decay_start_step, decay_steps=args.decay_steps,
        early_stop=args.early_stop, keep=args.keep,
        data_seed=args.data_seed, train_examples=args.train_examples, eval_examples=args.eval_examples, out=out,
        devices=args.devices, parallel=args.parallel, budget=args.budget,
        cache_dir=args.cache_dir, hash_buckets=args.hash_buckets, min_frequency=args.min_frequency,
        checkpoint_every=args.checkpoint_every, deterministic=args.deterministic,
        log_every=args.log_every, steps_per_execution=args.steps_per_execution, verbose=0 if args.quiet else "auto",
        xla=args.xla, mixed_precision=args.mixed_precision, threads=args.threads, memory_limit=args.memory_limit,
        **extra,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from tfdlrm.training.loop import train

    export_base = None
    if args.export is not None:
        from tfdlrm.serving.export import check_destination

        if not args.out:
            raise UserError("--export needs --out: it exports a checkpoint of the run directory")
        # Before training: an unwritable destination should not cost a training run.
        export_base, _ = check_destination(args.out, args.export or None, model_name=args.model)
    result = train(spec_from_args(args, args.model, args.seed, args.optimizer, args.out, restart=args.restart,
                                  verify_data=args.verify_data))
    if export_base is not None:
        from tfdlrm.serving.export import export_run

        # the best epoch on validation where the data has a validation split (what --early-stop keeps), else the last
        with_val = any("val" in e for e in result.epochs)
        export_run(args.out, out=str(export_base), log=print, checkpoint="best" if with_val else "latest")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tfdlrm.serving.export import export_run

    export_run(args.run_dir, out=args.out, version=args.version, force=args.force, dataset=args.dataset, log=print,
               checkpoint=args.checkpoint, quantize_bits=args.quantize_embeddings)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tfdlrm.compare import compare, format_table

    specs = [spec_from_args(args, model, seed, optimizer, None, per_model=True, curve_points=args.curve_points,
                            curve_examples=args.curve_examples)
             for optimizer in args.optimizers for model in args.models for seed in args.seeds]
    # The command that reproduces the report: --retrain/--restart only say how this run treated
    # earlier results, so they are left out.
    reproduce = [a for a in argv_of(args) if a not in ("--retrain", "--restart")]
    command = "python -m tfdlrm " + " ".join(shlex.quote(a) for a in reproduce)
    if args.export is not None and args.out is None:
        raise UserError("--export needs --out: the runs it exports are kept there")
    report = compare(specs, out=args.out, retrain=args.retrain, command=command, mixed_inputs=args.mixed_inputs)
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

    from tfdlrm.parallel.plan import plan_for
    from tfdlrm.presets import get_preset

    config = get_preset(args.preset, rows=args.rows, **config_overrides(args))
    plan = plan_for(config, args.devices, args.budget, args.model)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    from tfdlrm.tables import table_summary

    print(plan.format())
    summary = table_summary(config)
    if summary:
        print(summary[-1])  # the tables' bytes against full tables (each part is a row above)
    return 0


def strip_flags(argv: list[str], flags: tuple) -> list[str]:
    """``argv`` without ``flags`` and their values (``--flag VALUE`` or ``--flag=VALUE``; ``--json`` alone)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in flags:
            skip = "=" not in item and name != "--json"
            continue
        kept.append(item)
    return kept


def reference_from_args(args: argparse.Namespace):
    """``--reference DIR --torch-python PY`` as a :class:`tfdlrm.bench.reference.Reference`, both or neither."""
    if args.reference is None and args.torch_python is None:
        return None
    if args.reference is None or args.torch_python is None:
        raise UserError("--reference and --torch-python go together: the checkout of facebookresearch/dlrm and "
                        "the Python with PyTorch that runs it")
    from tfdlrm.bench.reference import Reference

    return Reference(args.reference, args.torch_python)


def cmd_bench_fit(args: argparse.Namespace) -> int:
    import json
    import shlex

    from tfdlrm.bench.fit import bench_fit, format_fit

    result = bench_fit(batch_sizes=args.batch_sizes, repeats=args.repeats, model=args.model, preset=args.preset,
                       rows=args.rows, examples=args.train_examples, extra=shlex.split(args.train_args),
                       tmp_dir=args.tmp_dir, data=args.data, reference=reference_from_args(args), lr=args.lr,
                       log=progress_log(args))
    print(json.dumps(result, indent=2) if args.json else format_fit(result))
    return 0


def cmd_bench_parallel(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.bench.parallel import bench_parallel, format_bench

    rows = bench_parallel(args.preset, args.rows, args.device_counts, args.batch_size, args.steps, args.warmup,
                          args.mode, args.model, budget=args.budget, overrides=config_overrides(args),
                          log=(lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr)))
    if args.json:
        print(json.dumps([vars(r) for r in rows], indent=2))
    else:
        print(format_bench(rows))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from tfdlrm.parallel.ps import run_server

    run_server()
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from tfdlrm.parallel.cluster import run_cluster
    from tfdlrm.parallel.devices import check_parallel_args, parse_bytes

    command = list(args.command[1:] if args.command[:1] == ["--"] else args.command)
    if command[:1] != ["train"]:
        raise UserError(f"tfdlrm cluster runs the chief's command after --: `-- train ARGS...`, got "
                        f"{shlex.join(command) or 'nothing'!r}")
    train = args.parse_chief(command)  # the chief's flags, checked before any process starts
    if train.parallel not in (None, "ps"):
        raise UserError(f"tfdlrm cluster trains with --parallel ps; drop --parallel {train.parallel}")
    check_parallel_args("ps", train.devices, train.budget, train.steps_per_epoch, tf_config=False)
    if train.parallel is None:
        command[1:1] = ["--parallel", "ps"]
    memory = parse_bytes(args.memory_per_process, "--memory-per-process") if args.memory_per_process else None
    return run_cluster(command, workers=args.workers, ps=args.ps, memory=memory, open_ports=args.open_ports,
                       ready_timeout=args.ready_timeout)


def cmd_generate(args: argparse.Namespace) -> int:
    from tfdlrm.pipelines.raw import GenerateSpec, generate

    generate(GenerateSpec(out=args.out, rows=args.rows, format=args.format, seed=args.seed,
                          table_rows=args.table_rows, dense_missing=args.missing, categorical_missing=args.missing,
                          gzip=args.gzip, overwrite=args.overwrite, progress=args.progress))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.features:
        return _convert_tabular(args)
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    spec = ConvertSpec(
        out=args.out, inputs=args.input or (), format=args.format, train=args.train or (), val=args.val or (),
        test=args.test or (), hash_buckets=args.hash_buckets, min_frequency=args.min_frequency,
        halve_held_out=args.halve_held_out, val_fraction=args.val_fraction, shuffle=args.shuffle, seed=args.seed, on_bad_row=args.on_bad_row,
        rows_per_shard=args.rows_per_shard, rows_per_block=args.rows_per_block, overwrite=args.overwrite,
        workers=args.workers, progress=args.progress,
    )
    print(convert(spec).summary())
    return 0


def _convert_tabular(args: argparse.Namespace) -> int:
    from tfdlrm.pipelines.tabular import TabularSpec, convert_tabular

    criteo_only = {"--input": args.input, "--hash-buckets": args.hash_buckets,
                   "--halve-held-out": args.halve_held_out or None}
    given = [flag for flag, value in criteo_only.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to Criteo files; with "
                        f"--features the feature spec says how each column maps (hash_buckets per column)")
    spec = TabularSpec(out=args.out, features=args.features, train=args.train or (), test=args.test or (),
                       val=args.val or (), val_fraction=args.val_fraction, min_frequency=args.min_frequency,
                       on_bad_row=args.on_bad_row, shuffle=args.shuffle, seed=args.seed,
                       rows_per_shard=args.rows_per_shard, rows_per_block=args.rows_per_block,
                       overwrite=args.overwrite, progress=args.progress)
    print(convert_tabular(spec).summary())
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.bench.pipeline import bench_pipeline

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

    from tfdlrm.bench.serving import bench_serving, format_bench_serving

    log = progress_log(args)
    result = bench_serving(args.saved_model, signature=args.signature, requests=args.requests,
                           batch_size=args.batch_size, batches=args.batches, model=args.model, preset=args.preset,
                           rows=args.rows, log=log)
    print(json.dumps(result, indent=2) if args.json else format_bench_serving(result))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    import json

    from tfdlrm.bench.train import bench_train, format_suite, run_suite

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
    reference = reference_from_args(args)
    if reference is not None:
        from tfdlrm.bench.train import bench_train_pairs, format_pairs
        from tfdlrm.presets import get_preset

        if args.model != "dlrm" or args.profile or args.optimizer != "sgd" or args.data != "memory":
            raise UserError("--reference runs the reference's DLRM with SGD on random rows: use --model dlrm, "
                            "--optimizer sgd, --data memory, without --profile")
        config = get_preset(args.preset, rows=args.rows, **config_overrides(args))
        result = bench_train_pairs(strip_flags(args.argv[2:], ("--reference", "--torch-python", "--pairs", "--json")),
                                   reference, config, args.batch_size or 2048, args.pairs, args.lr, log=log)
        print(json.dumps(result, indent=2) if args.json else format_pairs(result))
        return 0
    result = bench_train(model=args.model, preset=args.preset, rows=args.rows, data=args.data,
                         batch_size=args.batch_size or 2048, optimizer=args.optimizer, lr=args.lr,
                         warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                         distinct_batches=args.distinct_batches, xla=args.xla, mixed_precision=args.mixed_precision,
                         threads=args.threads,
                         overrides=config_overrides(args), tmp_dir=args.tmp_dir, profile=args.profile, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
