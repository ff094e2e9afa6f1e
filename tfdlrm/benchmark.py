"""``python -m tfdlrm bench train``: training throughput, as ``model.fit`` runs it.

One configuration per run (``--model``, ``--preset``, ``--data``, the speed switches
``--xla`` and ``--mixed-precision``), or ``--suite``: every figure of
``docs/benchmarks.md``, each configuration in a fresh process (so that each peak
memory is its own).

How a figure is made:

* the model is built and compiled as ``train`` does (``tfdlrm.training``), and trained
  with ``model.fit`` (Keras's loop and callbacks included);
* ``--data memory``: ``--distinct-batches`` batches of the preset's random data
  (``--data random``: uniform ids, so the tables are read all over, not from cache)
  are generated first and then repeated from memory; ``--data tfrecord``: Criteo-format
  rows (the real rows in ``../shared`` repeated, else generated rows) are written and
  converted (``--hash-buckets 1000000``) into a temporary directory, and training
  reads the converted dataset as ``train --data DIR`` does (shuffled); the reader's
  own rows/s is measured too;
* ``--warmup`` steps (tracing, XLA compilation) are not timed; then ``--repeats`` runs
  of ``--steps`` steps are timed, and the median run gives examples/s and ms per step
  (wall clock; CPU seconds per step are reported beside, a figure that moves less
  when other processes share the machine);
* peak memory is the process's peak resident set (``ru_maxrss``);
* the machine (CPU model, cores, bf16 support), the date and the load average before
  and after are printed with the figures.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tfdlrm.errors import UserError

# The paper's single-socket benchmark (Naumov et al. 2019, section 6): 1,000 batches in
# 256 s on one Xeon Gold 6138 socket (Caffe2); the PyTorch reference DLRM, measured
# on the 2-core machine this project is developed on (issue 7).
PAPER_BATCHES = 1000
PAPER_SECONDS = 256.0
REFERENCE = {
    "kaggle": {"ms_per_step": 54.0, "examples_per_second": 37_000, "target_examples_per_second": 75_000,
               "matmul_bound_examples_per_second": 110_000},
    "paper-benchmark": {"ms_per_step": 450.0, "target_ms_per_step": 225.0},
}
DEFAULT_STEPS = {  # preset: (warmup, steps per repeat, repeats)
    "paper-benchmark": (3, 5, 3),
}
FALLBACK_STEPS = (10, 20, 5)


# -- the machine --------------------------------------------------------------------------------------------------------
def machine() -> dict:
    """CPU model, cores, features and software versions; date and load average."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def huge_pages() -> dict:
    """Transparent huge pages: the kernel's mode, whether this process's malloc asks for
    them (``--huge-pages``), and how many bytes of it are in huge pages now."""
    from tfdlrm import _env

    anon = None
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"kernel_mode": _env.transparent_huge_pages(), "active": _env.huge_pages_active(),
            "anon_huge_bytes": anon}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# -- one configuration ------------------------------------------------------------------------------------------------
def _step_clock(warmup: int, steps: int):
    """A callback recording the wall and CPU seconds of each run of ``steps`` steps after ``warmup``."""
    import tensorflow as tf

    class Clock(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.runs: list[tuple[float, float]] = []
            self._mark = None

        def on_train_batch_end(self, batch, logs=None):
            done = batch + 1
            if done >= warmup and (done - warmup) % steps == 0:
                self.model.optimizer.iterations.numpy()  # wait for the step
                now = (time.perf_counter(), time.process_time())
                if self._mark is not None:
                    self.runs.append((now[0] - self._mark[0], now[1] - self._mark[1]))
                self._mark = now

    return Clock()


def bench_train(model: str = "dlrm", preset: str = "kaggle", rows: Optional[int] = None, data: str = "memory",
                batch_size: int = 2048, optimizer: str = "sgd", lr: float = 0.1, warmup: Optional[int] = None,
                steps: Optional[int] = None, repeats: Optional[int] = None, distinct_batches: Optional[int] = None,
                xla: str = "auto", mixed_precision: str = "auto", overrides: Optional[dict] = None,
                tfrecord_rows: Optional[int] = None, tmp_dir: Optional[str] = None, profile: Optional[str] = None,
                log: Callable[[str], None] = print) -> dict:
    """Train one configuration and return its figures (see the module docstring)."""
    import tensorflow as tf

    from pipelines.sources import open_data
    from tfdlrm.fast import resolve_mixed_precision, resolve_xla
    from tfdlrm.presets import get_preset
    from tfdlrm.training import build_model, compile_model

    default = DEFAULT_STEPS.get(preset, FALLBACK_STEPS)
    warmup = default[0] if warmup is None else warmup
    steps = default[1] if steps is None else steps
    repeats = default[2] if repeats is None else repeats
    if warmup < 1 or steps < 1 or repeats < 1:
        raise UserError("--warmup, --steps and --repeats must be at least 1")
    if data not in ("memory", "tfrecord"):
        raise UserError(f"--data must be memory or tfrecord, got {data!r}")
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
            f"step: xla {step_kind}, {'bf16' if precision else 'float32'} MLPs "
            f"(built in {time.perf_counter() - start:.1f} s)")
        clock = _step_clock(warmup, steps)
        start = time.perf_counter()
        net.fit(dataset, steps_per_epoch=total_steps, epochs=1, verbose=0, callbacks=[clock])
        log(f"trained {total_steps} steps in {time.perf_counter() - start:.1f} s ({warmup} warm-up steps untimed)")
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
            "warmup_steps": warmup,
            "steps_per_repeat": steps,
            "repeats": repeats,
            "ms_per_step": round(step * 1000, 2),
            "examples_per_second": round(batch_size / step),
            "cpu_ms_per_step": round(statistics.median(cpus) * 1000, 2),
            "runs_ms_per_step": [round(w * 1000, 2) for w in walls],
            "parameters": net.count_params(),
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
    from pipelines.bench import default_source, make_work_dir, write_raw
    from pipelines.criteo import ConvertSpec, convert
    from pipelines.sources import open_data

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


# -- profile ------------------------------------------------------------------------------------------------------------
def _profile(net, dataset, logdir: str, steps: int, log) -> list:
    """A TensorBoard profile of ``steps`` more steps in ``logdir``, and the top ops by time per step."""
    import tensorflow as tf

    Path(logdir).mkdir(parents=True, exist_ok=True)
    tf.profiler.experimental.start(logdir)
    net.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    tf.profiler.experimental.stop()
    top = top_ops(logdir, steps, limit=None)
    log(f"profile in {logdir} (TensorBoard's Profile tab); milliseconds per step in ops, summed over threads "
        f"(ops that run at the same time each count their own duration):")
    for name, ms in categorize(top):
        log(f"  {ms:8.2f}  {name}")
    log("top ops:")
    for row in top[:20]:
        log(f"  {row['ms_per_step']:8.2f}  {row['op']}")
    return {"categories": [{"part": name, "ms_per_step": round(ms, 2)} for name, ms in categorize(top)],
            "top_ops": top[:40]}


def categorize(top: list) -> list:
    """Op times per step grouped by what they do in a DLRM/DCN step, largest first."""
    import collections
    import re

    parts: collections.Counter = collections.Counter()
    for row in top:
        name, ms = row["op"], row["ms_per_step"]
        op, _, kind = name.partition(":")
        if not kind:  # an XLA thunk (fusion) name
            if "scatter" in op:
                part = "embedding row updates (XLA scatter)"
            elif "gather" in op or op.startswith("stack"):
                part = "embedding lookups (XLA gather)"
            elif re.match(r"(wrapped_)?reduce|reduce-window|ynn_fusion", op):
                part = "bag sums (XLA)"
            elif op.startswith(("MatMul", "maximum_dot", "dot")):
                part = "MLP matmuls (XLA)"
            else:
                part = "other compiled (XLA) work"
        elif kind in ("ResourceScatterAdd", "ResourceScatterSub", "ResourceSparseApplyAdagradV2", "Unique",
                      "UniqueV2", "UnsortedSegmentSum") and "interaction" not in op:
            part = "embedding row updates (TensorFlow)"
        elif kind in ("ResourceGather", "GatherV2") and "interaction" not in op:
            part = "embedding lookups (TensorFlow gather)"
        elif "interaction" in op:
            part = "dot interaction (forward and backward)"
        elif "Matmul" in kind or "MatMul" in kind:
            part = "MLP matmuls, backward" if op.startswith("gradient") else "MLP matmuls, forward"
        elif kind in ("BiasAddGrad", "ReluGrad", "Relu", "BiasAdd"):
            part = "MLP bias and ReLU (backward)"
        elif "sparse_arch" in op:
            part = "embedding layer: stack/unstack, id check"
        elif kind.startswith("ResourceApply") or "SGD" in op or "Adagrad" in op:
            part = "optimizer arithmetic (TensorFlow: -lr x gradient rows, dense weights)"
        elif "cross_net" in op:
            part = "DCN cross network (TensorFlow)"
        else:
            part = "other TensorFlow ops"
        parts[part] += ms
    return parts.most_common()


# Executor and thread-pool events that enclose op events (counting them would count twice).
_ENCLOSING = {"ThunkExecutor::Execute", "ExecutorState::Process", "ParallelFor", "SlinkyThreadPool::Await",
              "ExecutorState::ProcessAsync::Done", "ExecutorState::ProcessAsync::Start",
              "CpuExecutable::ExecuteAsyncOnStream", "BlockUntilReady"}


def top_ops(logdir: str, steps: int, limit: Optional[int] = 40) -> list:
    """Op (or XLA thunk) time per step from the newest ``*.xplane.pb`` under ``logdir``,
    summed over the worker threads, largest first.  Empty if the profiler's protobufs
    are not importable."""
    import collections
    import glob

    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:  # pragma: no cover
        return []
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return []
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(files[-1]).read_bytes())
    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python" or "tf_data" in line.name:
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name not in _ENCLOSING:
                    totals[name] += event.duration_ps / 1e9 / steps
    return [{"op": name, "ms_per_step": round(ms, 3)} for name, ms in totals.most_common(limit)]


# -- output ------------------------------------------------------------------------------------------------------------------
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
            f"xla {r['xla']}, mixed precision {r['mixed_precision']}, huge pages "
            f"{'on' if r.get('huge_pages', {}).get('active') else 'off'}: {r['examples_per_second']:,} examples/s, "
            f"{r['ms_per_step']:.1f} ms/step (median of {r['repeats']} x {r['steps_per_repeat']} steps: "
            f"{', '.join(f'{x:.1f}' for x in r['runs_ms_per_step'])}; CPU {r['cpu_ms_per_step']:.1f} ms/step), "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        ref = r.get("reference", {})
        if "examples_per_second" in ref:
            lines.append(f"PyTorch reference here: {ref['examples_per_second']:,} examples/s; target "
                         f"{ref['target_examples_per_second']:,} ({r['examples_per_second'] / ref['examples_per_second']:.2f}x "
                         f"the reference); matmul bound ~{ref['matmul_bound_examples_per_second']:,}")
        if "projected_seconds_for_1000_batches" in r:
            lines.append(f"projected 1,000 batches: {r['projected_seconds_for_1000_batches']:.0f} s (paper: "
                         f"{PAPER_SECONDS:.0f} s on one Xeon 6138 socket; PyTorch reference here "
                         f"{REFERENCE['paper-benchmark']['ms_per_step']:.0f} ms/iter, target <= "
                         f"{REFERENCE['paper-benchmark']['target_ms_per_step']:.0f} ms/iter)")
        if "reader_rows_per_second" in r:
            lines.append(f"reader alone: {r['reader_rows_per_second']:,} rows/s "
                         f"({r['reader_rows_per_second'] / r['examples_per_second']:.0f}x the training rate)")
    return "\n".join(lines)


# -- the suite -------------------------------------------------------------------------------------------------------------
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


def run_suite(extra: list[str], log: Callable[[str], None] = print, only: Optional[list[str]] = None) -> list:
    """Each configuration of :data:`SUITE` in a fresh ``python -m tfdlrm bench train --json``
    process; returns their results (a failed one as ``{"label", "error"}``)."""
    results = []
    for label, args in SUITE:
        if only and not any(word.lower() in label.lower() for word in only):
            continue
        command = [sys.executable, "-m", "tfdlrm", "bench", "train", *args, *extra, "--json"]
        log(f"== {label}: python -m tfdlrm bench train {' '.join(args + extra)}")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
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
