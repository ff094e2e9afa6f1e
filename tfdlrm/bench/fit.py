"""``bench fit``: ``train`` itself, end to end, as its metrics.json reports it.

Each run is ``python -m tfdlrm train --data synthetic`` in a fresh process with every default on
(progress lines, validation and test evaluation, checkpoints, TensorBoard), on generated rows
made while training (the stream ``train`` reads); the figure is metrics.json's
``examples_per_second`` (training time: evaluations and checkpoint writes excluded), beside the
process's wall time, CPU time and peak memory.  Batch sizes are interleaved, repeat by repeat, so
that a noisy machine spreads over all of them; the median is reported.  See docs/benchmarks.md.
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
from tfdlrm.bench.train import REFERENCE
from tfdlrm.errors import UserError

# The PyTorch reference DLRM on this machine (examples/s, kaggle preset, SGD): batch 128 on the
# ~500k rows `train --data synthetic` trains on (issue 13), batch 2048 its step (issue 7).
REFERENCE_FIT = {128: 17_955, 2048: REFERENCE["kaggle"]["examples_per_second"]}
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
              extra: Sequence[str] = (), tmp_dir: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """Run ``train`` ``repeats`` times per batch size; medians and every run's figures."""
    if repeats < 1 or not batch_sizes:
        raise UserError("bench fit needs at least one batch size and one repeat")
    before = machine()
    work = make_work_dir("tfdlrm-bench-fit-", tmp_dir)
    runs: dict[int, list[dict]] = {b: [] for b in batch_sizes}
    try:
        for r in range(repeats):
            for b in batch_sizes:
                args = ["--data", "synthetic", "--model", model, "--preset", preset, "--batch-size", str(b),
                        "--train-examples", str(examples or default_examples(b)), "--epochs", "1", *extra]
                if rows:
                    args += ["--rows", str(rows)]
                out = work / f"batch{b}-run{r + 1}"
                run = run_train(args, out)
                shutil.rmtree(out, ignore_errors=True)
                runs[b].append(run)
                log(f"batch {b:>5}, run {r + 1}/{repeats}: {run['examples_per_second']:>7,} examples/s "
                    f"({run['examples']:,} examples in {run['train_seconds']:.1f} s of training, "
                    f"{run['wall_seconds']:.1f} s for the command, {run['cpu_seconds']:.0f} CPU-s, "
                    f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = []
    for b, rs in runs.items():
        speed = statistics.median(r["examples_per_second"] for r in rs)
        row = {"batch_size": b, "examples_per_second": round(speed), "runs": rs,
               "wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs)}
        if model == "dlrm" and preset == "kaggle" and not rows and b in REFERENCE_FIT:
            row["reference_examples_per_second"] = REFERENCE_FIT[b]
            row["ratio_to_reference"] = round(speed / REFERENCE_FIT[b], 2)
        results.append(row)
    return {"bench": "fit", "model": model, "preset": preset, "rows": rows, "repeats": repeats,
            "extra_args": list(extra), "results": results, "machine": before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def format_fit(result: dict) -> str:
    lines = [f"train end to end ({result['model']}, preset {result['preset']}, generated data, every default on; "
             f"median of {result['repeats']}):",
             f"{'batch':>6} {'examples/s':>11} {'reference':>10} {'ratio':>6} {'wall s':>7} {'peak RSS':>9}"]
    for row in result["results"]:
        ref = row.get("reference_examples_per_second")
        lines.append(f"{row['batch_size']:>6} {row['examples_per_second']:>11,} {f'{ref:,}' if ref else '-':>10} "
                     f"{row.get('ratio_to_reference', '-'):>6} {row['wall_seconds']:>7.1f} "
                     f"{row['peak_rss_bytes'] / 2**30:>8.2f}G")
    m = result["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores; TensorFlow {m.get('tensorflow')}; {m['date']}; "
                 f"load average {' '.join(map(str, m['load_average']))} before, "
                 f"{' '.join(map(str, result['load_average_after']))} after")
    return "\n".join(lines)
