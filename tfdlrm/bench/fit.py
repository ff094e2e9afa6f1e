"""``bench fit``: ``train`` itself, end to end, as its metrics.json reports it, beside the reference.

Each run is ``python -m tfdlrm train`` in a fresh process with every default on (progress lines,
validation and test evaluation, checkpoints, TensorBoard), on a converted dataset (``--data DIR``)
or on generated rows made while training (``--data synthetic``, the default); the figure is
metrics.json's ``examples_per_second`` (training time: evaluations and checkpoint writes excluded),
beside the process's wall time, CPU time and peak memory.  Given the reference's checkout and a
Python with PyTorch (``--reference DIR --torch-python PY``), the same rows, as tfdlrm's reader yields
them, are dumped once and the reference's ``DLRM_Net`` trains one epoch on them right after each of
our runs (``tfdlrm/bench/reference.py``): pairs in the same minutes, so that a noisy machine spreads
over both.  Batch sizes are interleaved, repeat by repeat; medians are reported.  See
docs/benchmarks.md.
"""
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

from tfdlrm.bench.common import machine, make_work_dir
from tfdlrm.errors import UserError

DEFAULT_EXAMPLES = {128: 500_000, 2048: 2_000_000}  # about 20-30 s of training each


def default_examples(batch_size: int) -> int:
    """Training rows of a run: ~500k at small batches up to ~2M at 2048 and more."""
    if batch_size in DEFAULT_EXAMPLES:
        return DEFAULT_EXAMPLES[batch_size]
    return 500_000 if batch_size < 1024 else 2_000_000


def run_train(args: list[str], out: Path) -> dict:
    """One ``train`` process; its metrics.json figures with the process's wall and CPU seconds and
    peak RSS.  A failed run is a UserError quoting its last lines."""
    command = [sys.executable, "-m", "tfdlrm", "train", *args, "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not (out / "metrics.json").exists():
        tail = " | ".join(line for line in output.strip().splitlines()[-3:])
        raise UserError(f"bench fit: `train {' '.join(args)}` failed (exit {proc.returncode}): {tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    steps_line = next((line for line in output.splitlines() if "steps a call" in line), "")
    return {
        "examples": metrics["examples"],
        "examples_per_second": round(metrics["examples_per_second"]),
        "train_seconds": round(metrics["train_seconds"], 2),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_bytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        "test_auc": round(metrics["evaluation"]["auc"], 4),
        "steps_a_call": int(steps_line.split(" steps a call")[0].rsplit(" ", 1)[-1]) if steps_line else None,
    }


def bench_fit(batch_sizes: Sequence[int] = (128, 2048), repeats: int = 3, model: str = "dlrm",
              preset: str = "kaggle", rows: Optional[int] = None, examples: Optional[int] = None,
              extra: Sequence[str] = (), tmp_dir: Optional[str] = None, data: Optional[str] = None,
              reference=None, lr: float = 0.1, log: Callable[[str], None] = print) -> dict:
    """Run ``train`` ``repeats`` times per batch size (and the reference after each run, given a
    :class:`tfdlrm.bench.reference.Reference`); medians and every run's figures."""
    if repeats < 1 or not batch_sizes:
        raise UserError("bench fit needs at least one batch size and one repeat")
    synthetic = data in (None, "synthetic")
    if not synthetic and (examples or rows):
        raise UserError("--train-examples and --rows are for --data synthetic: a converted dataset has its own")
    if reference is not None:
        if model != "dlrm":
            raise UserError("--reference trains the reference's DLRM_Net: use --model dlrm")
        if synthetic and len({examples or default_examples(b) for b in batch_sizes}) > 1:
            raise UserError("--reference with --data synthetic: give --train-examples, so that every batch "
                            "size trains on the rows dumped for the reference")
        reference.check()
        # the reference's inputs (its bottom MLP takes the raw log counts), unless --train-args says otherwise
        extra = ["--dense-norm", "none", *extra]
    before = machine()
    work = make_work_dir("tfdlrm-bench-fit-", tmp_dir)
    runs: dict[int, list[dict]] = {b: [] for b in batch_sizes}
    theirs: dict[int, list[dict]] = {b: [] for b in batch_sizes}
    try:
        npz = None
        if reference is not None:
            npz = str(work / "rows.npz")
            counts = _dump(data or "synthetic", preset, rows, examples or default_examples(min(batch_sizes)), npz)
            log(f"rows for the reference: {counts['train_rows']:,} train, {counts['held_out_rows']:,} held out "
                f"({npz}); tfdlrm's runs take them as the reference does (--dense-norm none)")
        for r in range(repeats):
            for b in batch_sizes:
                args = ["--data", data or "synthetic", "--model", model, "--preset", preset, "--batch-size", str(b),
                        "--epochs", "1", "--optimizer", "sgd", "--lr", str(lr), *extra]
                if synthetic:
                    args += ["--train-examples", str(examples or default_examples(b))]
                if rows:
                    args += ["--rows", str(rows)]
                out = work / f"batch{b}-run{r + 1}"
                run = run_train(args, out)
                shutil.rmtree(out, ignore_errors=True)
                runs[b].append(run)
                log(f"batch {b:>5}, run {r + 1}/{repeats}: {run['examples_per_second']:>7,} examples/s "
                    f"({run['examples']:,} examples in {run['train_seconds']:.1f} s of training, "
                    f"{run['wall_seconds']:.1f} s for the command, {run['cpu_seconds']:.0f} CPU-s, "
                    f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB; test AUC {run['test_auc']:.4f})")
                if reference is not None:
                    from tfdlrm.presets import get_preset

                    ref = reference.fit(npz, b, lr, get_preset(preset))
                    theirs[b].append(ref)
                    log(f"batch {b:>5}, run {r + 1}/{repeats}: reference {ref['examples_per_second']:>7,} examples/s "
                        f"({ref['examples']:,} examples in {ref['train_seconds']:.1f} s, {ref['cpu_seconds']:.0f} "
                        f"CPU-s; test AUC {ref['auc']:.4f}; torch {ref['torch']}, {ref['threads']} threads)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = []
    for b, rs in runs.items():
        speed = statistics.median(r["examples_per_second"] for r in rs)
        row = {"batch_size": b, "examples_per_second": round(speed), "runs": rs,
               "wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
               "test_auc": statistics.median(r["test_auc"] for r in rs)}
        if theirs[b]:
            ref_speed = statistics.median(t["examples_per_second"] for t in theirs[b])
            row.update(reference_examples_per_second=round(ref_speed), reference_runs=theirs[b],
                       ratio_to_reference=round(speed / ref_speed, 2),
                       pair_ratios=[round(o["examples_per_second"] / t["examples_per_second"], 2)
                                    for o, t in zip(rs, theirs[b])],
                       reference_test_auc=statistics.median(t["auc"] for t in theirs[b]))
        results.append(row)
    return {"bench": "fit", "model": model, "preset": preset, "data": data or "synthetic", "rows": rows,
            "repeats": repeats, "extra_args": list(extra), "results": results, "machine": before,
            "reference": None if reference is None else {"checkout": reference.checkout, "python": reference.python},
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def _dump(data: str, preset: str, rows: Optional[int], examples: int, path: str) -> dict:
    """The rows ``train --data DATA`` trains on, in an .npz for the reference."""
    from tfdlrm.bench.reference import dump_rows
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.presets import get_preset

    config = get_preset(preset, **({"rows": rows} if rows else {}))
    return dump_rows(open_data(data, config, train_examples=examples), path)


def format_fit(result: dict) -> str:
    with_reference = result.get("reference") is not None
    lines = [f"train end to end ({result['model']}, preset {result['preset']}, data {result['data']}, every default "
             f"on; median of {result['repeats']}" + ("; the reference after each run, on the same rows" if
                                                      with_reference else "") + "):",
             f"{'batch':>6} {'examples/s':>11} {'reference':>10} {'ratio':>6} {'pairs':>16} {'AUC':>7} {'ref AUC':>7} "
             f"{'wall s':>7} {'peak RSS':>9}"]
    for row in result["results"]:
        ref = row.get("reference_examples_per_second")
        pairs = " ".join(f"{x:.2f}" for x in row.get("pair_ratios", [])) or "-"
        ref_auc = row.get("reference_test_auc")
        lines.append(f"{row['batch_size']:>6} {row['examples_per_second']:>11,} {f'{ref:,}' if ref else '-':>10} "
                     f"{row.get('ratio_to_reference', '-'):>6} {pairs:>16} {row['test_auc']:>7.4f} "
                     f"{f'{ref_auc:.4f}' if ref_auc is not None else '-':>7} {row['wall_seconds']:>7.1f} "
                     f"{row['peak_rss_bytes'] / 2**30:>8.2f}G")
    m = result["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_features']) or 'no AVX-512'}); "
                 f"TensorFlow {m.get('tensorflow')}; {m['date']}; load average "
                 f"{' '.join(map(str, m['load_average']))} before, {' '.join(map(str, result['load_average_after']))} "
                 f"after")
    if not with_reference:
        lines.append("no reference run: --reference DIR --torch-python PY runs facebookresearch/dlrm here on the "
                     "same rows (docs/benchmarks.md)")
    return "\n".join(lines)
