"""``bench train``: training steps per second, the suite of switches, against the reference (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tfdlrm.bench.common import huge_pages, machine, peak_rss_bytes, step_clock
from tfdlrm.bench.profile import _profile
from tfdlrm.errors import UserError

# The paper's single-socket benchmark (Naumov et al. 2019, section 6): 1,000 batches in
# 256 s on one Xeon Gold 6138 socket (Caffe2).  The PyTorch reference's figures recorded on another
# day and CPU (an AMD EPYC, Zen 4, 2 vCPUs; issue 7) are printed as such, never as a ratio: a
# baseline is the reference run here, now (``--reference DIR --torch-python PY``).
PAPER_BATCHES = 1000
PAPER_SECONDS = 256.0
RECORDED = "2026-11-27 on an AMD EPYC (Zen 4, 2 vCPUs)"
REFERENCE = {
    "kaggle": {"ms_per_step": 54.0, "examples_per_second": 37_000},
    "paper-benchmark": {"ms_per_step": 450.0},
}


DEFAULT_STEPS = {  # preset: (warmup, steps per repeat, repeats)
    "paper-benchmark": (3, 5, 3),
}


FALLBACK_STEPS = (10, 20, 5)


def bench_train(model: str = "dlrm", preset: str = "kaggle", rows: Optional[int] = None, data: str = "memory",
                batch_size: int = 2048, optimizer: str = "sgd", lr: float = 0.1, warmup: Optional[int] = None,
                steps: Optional[int] = None, repeats: Optional[int] = None, distinct_batches: Optional[int] = None,
                xla: str = "auto", mixed_precision: str = "auto", threads: str = "auto",
                overrides: Optional[dict] = None, tfrecord_rows: Optional[int] = None, tmp_dir: Optional[str] = None,
                profile: Optional[str] = None, floor: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train one configuration and return its figures (see the module docstring)."""
    from tfdlrm.training.threads import use_thread_pools

    pools = use_thread_pools(batch_size, threads)  # before TensorFlow's runtime starts, as train does
    import tensorflow as tf

    from tfdlrm.models.fast_step import resolve_mixed_precision, resolve_xla
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.presets import get_preset
    from tfdlrm.training.compile import build_model, compile_model
    from tfdlrm.training.stream import steps_a_call, steps_per_execution

    default = DEFAULT_STEPS.get(preset, FALLBACK_STEPS)
    warmup = default[0] if warmup is None else warmup
    steps = default[1] if steps is None else steps
    repeats = default[2] if repeats is None else repeats
    if warmup < 1 or steps < 1 or repeats < 1:
        raise UserError("--warmup, --steps and --repeats must be at least 1")
    if data not in ("memory", "tfrecord"):
        raise UserError(f"--data must be memory or tfrecord, got {data!r}")
    # train's steps a call (--log-every 100): warm-up and timed runs in whole calls
    per_call = steps_per_execution(batch_size, 100)
    warmup, steps = (-(-n // per_call) * per_call for n in (warmup, steps))
    before = machine()
    precision = resolve_mixed_precision(mixed_precision)
    step_kind = resolve_xla(xla)
    config = get_preset(preset, rows=rows, **(overrides or {}))
    if distinct_batches is None:  # bags of 100 ids: 16 batches already read every row many times
        distinct_batches = 64 if config.ids_per_lookup == 1 else 16
    total_steps = warmup + steps * repeats
    work = None
    result: dict = {}
    try:
        if data == "memory":
            source = open_data("random", config, train_examples=batch_size * distinct_batches,
                               eval_examples=batch_size)
            start = time.perf_counter()
            dataset = source.train_dataset(batch_size).take(distinct_batches).cache()
            for _ in dataset:  # generate once, outside the timing
                pass
            log(f"data: {distinct_batches} random batches of {batch_size} in memory "
                f"({time.perf_counter() - start:.1f} s to generate), repeated")
            dataset = dataset.repeat().prefetch(2)
            data_info = {"kind": "random, in memory", "distinct_batches": distinct_batches}
        else:
            work, source, data_info = _tfrecord_source(config, batch_size, total_steps, tfrecord_rows, tmp_dir, log)
            config = source.config
            dataset = source.train_dataset(batch_size, seed=1).repeat()
        tf.keras.utils.set_random_seed(1)
        start = time.perf_counter()
        net = build_model(model, config, mixed_precision=precision)
        compile_model(net, optimizer, lr, metrics=False, xla=step_kind)
        log(f"{model}, preset {preset}: {config.num_tables} tables x {config.table_rows[0]:,} rows, dim "
            f"{config.embedding_dim}, {config.ids_per_lookup} id(s) per lookup, batch {batch_size}, {optimizer}; "
            f"step: xla {step_kind}, {'bf16' if precision else 'float32'} MLPs, {per_call} steps a call; {pools} "
            f"(built in {time.perf_counter() - start:.1f} s)")
        clock = step_clock(warmup, steps)
        start = time.perf_counter()
        with steps_a_call(net, per_call):
            net.fit(dataset, steps_per_epoch=total_steps, epochs=1, verbose=0, callbacks=[clock])
        log(f"trained {total_steps} steps in {time.perf_counter() - start:.1f} s ({warmup} warm-up steps untimed)")
        if floor and model == "dlrm":
            from tfdlrm.bench.floor import mlp_floor

            result["floor"] = mlp_floor(config, batch_size, per_call, bf16=precision == "bf16")
        if profile:
            result["profile"] = _profile(net, dataset, profile, steps=min(steps, 10), log=log)
        walls = [w / steps for w, _ in clock.runs]
        cpus = [c / steps for _, c in clock.runs]
        step = statistics.median(walls)
        result.update({
            "bench": "train",
            "model": model,
            "preset": preset,
            "data": data_info,
            "table_rows": config.table_rows[0] if len(set(config.table_rows)) == 1 else list(config.table_rows),
            "tables": config.num_tables,
            "embedding_dim": config.embedding_dim,
            "ids_per_lookup": config.ids_per_lookup,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "xla": step_kind,
            "mixed_precision": precision or "off",
            "threads": pools,
            "steps_a_call": per_call,
            "warmup_steps": warmup,
            "steps_per_repeat": steps,
            "repeats": repeats,
            "ms_per_step": round(step * 1000, 2),
            "examples_per_second": round(batch_size / step),
            "cpu_ms_per_step": round(statistics.median(cpus) * 1000, 2),
            "runs_ms_per_step": [round(w * 1000, 2) for w in walls],
            "parameters": net.count_params(),
            **({"step_over_floor": round(step * 1000 / result["floor"]["ms_per_step"], 2)} if "floor" in result else {}),
            "embedding_bytes": sum(config.table_rows) * config.embedding_dim * 4,
        })
        if preset == "paper-benchmark":
            result["projected_seconds_for_1000_batches"] = round(step * PAPER_BATCHES, 1)
            result["paper_seconds_for_1000_batches"] = PAPER_SECONDS
        if (model == "dlrm" and preset in REFERENCE and config.table_rows == get_preset(preset).table_rows
                and batch_size == 2048):
            result["reference"] = REFERENCE[preset]
        if data == "tfrecord":
            result["reader_rows_per_second"] = data_info.pop("reader_rows_per_second")
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["huge_pages"] = huge_pages()
    result["machine"] = before
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    log(format_result(result))
    return result


def _tfrecord_source(config, batch_size: int, total_steps: int, rows: Optional[int], tmp_dir: Optional[str], log):
    """A converted Criteo dataset in a temporary directory, opened as ``train --data DIR`` does."""
    from tfdlrm.bench.common import default_source, make_work_dir, write_raw
    from tfdlrm.pipelines.convert import ConvertSpec, convert
    from tfdlrm.pipelines.sources import open_data

    if config.ids_per_lookup != 1 or config.num_dense != 13 or config.num_tables != 26:
        raise UserError("--data tfrecord needs a Criteo-shaped preset (13 dense, 26 one-hot features): kaggle, "
                        "terabyte, mlperf or tiny")
    # 7-day split: 6/7 of the rows train; enough for one pass without repeating.
    rows = rows or batch_size * total_steps * 7 // 6 + 14 * batch_size
    work = make_work_dir("tfdlrm-bench-train-", tmp_dir)
    raw = work / "train.txt"
    start = time.perf_counter()
    what = write_raw(raw, rows, default_source())
    conversion = convert(ConvertSpec(out=str(work / "data"), inputs=[str(raw)], format="kaggle",
                                     hash_buckets=1_000_000, progress=False), log=lambda s: None)
    raw.unlink()
    log(f"data: {rows:,} rows of {what}, converted (--hash-buckets 1000000) in "
        f"{time.perf_counter() - start:.1f} s")
    source = open_data(str(work / "data"), config)
    # The reader alone, as training reads it (shuffled, decoded, batched), in steady state:
    # the first batches (opening files, filling the shuffle buffer) are not timed.
    batches = iter(source.train_dataset(batch_size, seed=2).repeat())
    for _ in range(10):
        next(batches)
    timed = max(total_steps, 200)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    reader = timed * batch_size / (time.perf_counter() - start)
    n = source.train_examples
    log(f"reader: {reader:,.0f} rows/s ({timed} batches of {batch_size} after 10 untimed, from Python)")
    info = {"kind": "converted Criteo TFRecord dataset (hash buckets 1,000,000), shuffled reading",
            "rows": conversion.rows_read, "train_rows": int(n), "source_rows": what,
            "reader_rows_per_second": round(reader)}
    return work, source, info


def format_result(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_features']) or 'no AVX-512'}), "
        f"{m.get('memory_gib')} GiB; TensorFlow {m.get('tensorflow')}; {m['date']}; load average "
        f"{' '.join(map(str, m['load_average']))} before, {' '.join(map(str, r['load_average_after']))} after",
    ]
    if "ms_per_step" in r:
        lines.append(
            f"{r['model']} {r['preset']} ({r['data']['kind']}), batch {r['batch_size']}, {r['optimizer']}, "
            f"xla {r['xla']}, mixed precision {r['mixed_precision']}, {r.get('threads', '')}, huge pages "
            f"{'on' if r.get('huge_pages', {}).get('active') else 'off'}: {r['examples_per_second']:,} examples/s, "
            f"{r['ms_per_step']:.1f} ms/step (median of {r['repeats']} x {r['steps_per_repeat']} steps: "
            f"{', '.join(f'{x:.1f}' for x in r['runs_ms_per_step'])}; CPU {r['cpu_ms_per_step']:.1f} ms/step), "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        if "floor" in r:
            f = r["floor"]
            lines.append(f"MLP-only floor, same process: {f['ms_per_step']:.2f} ms/step ({f['precision']}, bottom "
                         f"{f['bottom_mlp']}, top {f['top_mlp']}, no biases: forward, backward and SGD alone); the "
                         f"step is {r['step_over_floor']:.2f}x the floor")
        ref = r.get("reference", {})
        if "examples_per_second" in ref:
            lines.append(f"PyTorch reference recorded {RECORDED}: {ref['examples_per_second']:,} examples/s, "
                         f"another machine, not a baseline (--reference DIR --torch-python PY runs it here)")
        if "projected_seconds_for_1000_batches" in r:
            lines.append(f"projected 1,000 batches: {r['projected_seconds_for_1000_batches']:.0f} s (paper: "
                         f"{PAPER_SECONDS:.0f} s on one Xeon 6138 socket; PyTorch reference recorded {RECORDED}: "
                         f"{REFERENCE['paper-benchmark']['ms_per_step']:.0f} ms/iter)")
        if "reader_rows_per_second" in r:
            lines.append(f"reader alone: {r['reader_rows_per_second']:,} rows/s "
                         f"({r['reader_rows_per_second'] / r['examples_per_second']:.0f}x the training rate)")
    return "\n".join(lines)


# (label, arguments): every figure of docs/benchmarks.md.  "stock" is where this issue
# started: Keras's own step, float32, 4 KiB pages.
STOCK = ["--xla", "off", "--mixed-precision", "off", "--huge-pages", "off"]
SUITE = [
    ("DLRM kaggle, defaults", ["--model", "dlrm", "--preset", "kaggle"]),
    ("DLRM kaggle, stock step fp32", ["--model", "dlrm", "--preset", "kaggle", *STOCK]),
    ("DLRM kaggle, xla sparse fp32", ["--model", "dlrm", "--preset", "kaggle", "--xla", "sparse",
                                      "--mixed-precision", "off"]),
    ("DLRM kaggle, xla full fp32", ["--model", "dlrm", "--preset", "kaggle", "--xla", "full",
                                    "--mixed-precision", "off"]),
    ("DLRM kaggle, stock step bf16", ["--model", "dlrm", "--preset", "kaggle", "--xla", "off",
                                      "--mixed-precision", "bf16"]),
    ("DLRM kaggle, defaults but 4 KiB pages", ["--model", "dlrm", "--preset", "kaggle", "--huge-pages", "off"]),
    ("DCN kaggle, defaults", ["--model", "dcn", "--preset", "kaggle"]),
    ("DCN kaggle, stock step fp32", ["--model", "dcn", "--preset", "kaggle", *STOCK]),
    ("DLRM paper-benchmark, defaults", ["--model", "dlrm", "--preset", "paper-benchmark"]),
    ("DLRM paper-benchmark, stock step fp32", ["--model", "dlrm", "--preset", "paper-benchmark", *STOCK]),
    ("DLRM kaggle, TFRecord data, defaults", ["--model", "dlrm", "--preset", "kaggle", "--data", "tfrecord"]),
]


def run_bench_train(args: Sequence[str]) -> subprocess.CompletedProcess:
    """``python -m tfdlrm bench train ARGS --json`` in a fresh process, this checkout first on the path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "tfdlrm", "bench", "train", *args, "--json"],
                          capture_output=True, text=True, env=env)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or ["(no output)"])[-1]


def run_suite(extra: list[str], log: Callable[[str], None] = print, only: Optional[list[str]] = None) -> list:
    """Each configuration of :data:`SUITE` in a fresh ``python -m tfdlrm bench train --json``
    process; returns their results (a failed one as ``{"label", "error"}``)."""
    results = []
    for label, args in SUITE:
        if only and not any(word.lower() in label.lower() for word in only):
            continue
        log(f"== {label}: python -m tfdlrm bench train {' '.join(args + extra)}")
        proc = run_bench_train([*args, *extra])
        if proc.returncode != 0:
            tail = last_line(proc)
            log(f"   failed: {tail}")
            results.append({"label": label, "args": args, "error": tail})
            continue
        result = json.loads(proc.stdout)
        result["label"], result["args"] = label, args
        log("   " + format_result(result).replace("\n", "\n   "))
        results.append(result)
    return results


def format_suite(results: list) -> str:
    """A Markdown table of a suite's results."""
    lines = ["| configuration | examples/s | ms/step | CPU ms/step | peak RSS | load before / after |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | |")
            continue
        load = f"{r['machine']['load_average'][0]:.2f} / {r['load_average_after'][0]:.2f}"
        lines.append(f"| {r['label']} | {r['examples_per_second']:,} | {r['ms_per_step']:.1f} | "
                     f"{r['cpu_ms_per_step']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {load} |")
    return "\n".join(lines)


def bench_train_pairs(argv: list[str], reference, config, batch_size: int, pairs: int = 3, lr: float = 0.1,
                      log: Callable[[str], None] = print) -> dict:
    """``pairs`` times: ``bench train ARGV`` in a fresh process, then the reference's own random-data
    run with the same tables, MLPs and batch (:meth:`tfdlrm.bench.reference.Reference.random_step`);
    medians of each side and the ratio, every pair kept."""
    reference.check()
    ours, theirs = [], []
    for k in range(pairs):
        proc = run_bench_train(argv)
        if proc.returncode != 0:
            raise UserError(f"bench train failed (exit {proc.returncode}): {last_line(proc)}")
        ours.append(json.loads(proc.stdout))
        theirs.append(reference.random_step(config, batch_size, lr=lr))
        if config.interaction == "dot":
            theirs[-1]["floor"] = reference.floor(config, batch_size)
        log(f"pair {k + 1}/{pairs}: tfdlrm {ours[-1]['examples_per_second']:,} examples/s "
            f"({ours[-1]['ms_per_step']:.1f} ms/step; MLP floor {ours[-1].get('floor', {}).get('ms_per_step', '-')} "
            f"ms), reference {theirs[-1]['examples_per_second']:,} ({theirs[-1]['ms_per_step']:.1f} ms/step; "
            f"PyTorch's MLP floor {theirs[-1].get('floor', {}).get('ms_per_step', '-')} ms)")
    mine = statistics.median(o["examples_per_second"] for o in ours)
    ref = statistics.median(t["examples_per_second"] for t in theirs)
    floors = {}
    if all("floor" in o for o in ours) and all("floor" in t for t in theirs):
        floors = {"floor_ms_per_step": statistics.median(o["floor"]["ms_per_step"] for o in ours),
                  "reference_floor_ms_per_step": statistics.median(t["floor"]["ms_per_step"] for t in theirs)}
    return {"bench": "train pairs", "pairs": pairs, "ours": ours, "reference_runs": theirs,
            "examples_per_second": round(mine), "reference_examples_per_second": round(ref),
            "ratio_to_reference": round(mine / ref, 2),
            "pair_ratios": [round(o["examples_per_second"] / t["examples_per_second"], 2)
                            for o, t in zip(ours, theirs)],
            **floors, "machine": ours[0]["machine"]}


def format_pairs(result: dict) -> str:
    last = result["ours"][-1]
    lines = [format_result(last),
             f"tfdlrm {result['examples_per_second']:,} examples/s against the reference's "
             f"{result['reference_examples_per_second']:,} (its own dlrm_s_pytorch.py --data-generation=random, the "
             f"same tables, MLPs and batch), medians of {result['pairs']} pairs run one after the other: "
             f"{result['ratio_to_reference']:.2f}x (pairs: {', '.join(f'{x:.2f}' for x in result['pair_ratios'])})"]
    if "floor_ms_per_step" in result:
        lines.append(f"MLP-only floor, medians of the same runs: TensorFlow {result['floor_ms_per_step']:.2f} ms a step, "
                     f"PyTorch {result['reference_floor_ms_per_step']:.2f} ms (the same MLPs, forward, backward and "
                     f"SGD alone; PyTorch one step a Python call)")
    return "\n".join(lines)
