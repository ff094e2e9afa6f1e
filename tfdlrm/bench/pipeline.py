"""``bench pipeline``: converter and reader throughput on raw rows (docs/data.md)."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tfdlrm.bench.common import default_source, make_work_dir, write_raw
from tfdlrm.errors import UserError


def _rows_per_second_reduce(dataset) -> tuple[int, float]:
    import tensorflow as tf

    start = time.perf_counter()
    rows = dataset.reduce(tf.constant(0, tf.int64),
                          lambda n, batch: n + tf.cast(tf.shape(batch[1])[0], tf.int64)).numpy()
    return int(rows), time.perf_counter() - start


def bench_pipeline(rows: int = 2_000_000, source: Optional[str] = None, batch_sizes: Sequence[int] = (128, 1024, 4096),
                   repeats: int = 3, train_steps: int = 0, train_batch_size: int = 128, workers: int = 2,
                   verbatim: bool = False, tmp_dir: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark (see the module docstring); returns the figures as a dict."""
    from tfdlrm.pipelines.convert import ConvertSpec, convert
    from tfdlrm.pipelines.reader import CriteoDataset

    if rows < 7 * 2:
        raise UserError(f"--rows must be at least 14 (a 7-day split), got {rows}")
    src = Path(source) if source else default_source()
    if source and not src.is_file():
        raise UserError(f"--source file not found: {source}")
    work = make_work_dir("tfdlrm-bench-", tmp_dir)
    try:
        raw = work / "train.txt"
        start = time.perf_counter()
        try:
            what = write_raw(raw, rows, src, verbatim)
        except OSError as e:  # a full disk
            raise UserError(f"cannot write the raw rows to {raw}: {e.strerror or e}") from None
        log(f"raw data: {rows:,} rows ({raw.stat().st_size / 1e6:,.0f} MB) of {what}; "
            f"written in {time.perf_counter() - start:.1f} s")
        result = {"rows": rows, "raw_bytes": raw.stat().st_size, "raw_rows": what,
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                              "python": platform.python_version()},
                  "converter": {}, "reader": {}}
        converted = None
        for mode, kwargs in (("vocabulary (min frequency 1)", {"min_frequency": 1}),
                             ("hash (1,000,000 buckets)", {"hash_buckets": 1_000_000})):
            out = work / ("vocab" if "min_frequency" in kwargs else "hash")
            conversion = convert(ConvertSpec(out=str(out), inputs=[str(raw)], format="kaggle", workers=workers,
                                             progress=False, **kwargs))
            result["converter"][mode] = {"seconds": round(conversion.seconds, 3),
                                         "rows_per_second": round(conversion.rows_per_second)}
            log(f"converter, {mode}: {conversion.rows_read:,} rows in {conversion.seconds:.2f} s = "
                f"{conversion.rows_per_second:,.0f} rows/s")
            converted = converted or out
        dataset = CriteoDataset(converted)
        train_rows = dataset.rows("train")
        for batch in batch_sizes:
            runs = []
            for r in range(repeats):
                n, seconds = _rows_per_second_reduce(dataset.dataset("train", batch, seed=r + 1))
                if n != train_rows:
                    raise RuntimeError(f"reader returned {n} rows, the split has {train_rows}")
                runs.append(n / seconds)
            result["reader"][f"batch_{batch}"] = {"rows_per_second": round(statistics.median(runs)),
                                                  "runs": [round(x) for x in runs]}
            log(f"reader, batch {batch}: median {statistics.median(runs):,.0f} rows/s over {repeats} epochs of "
                f"{train_rows:,} rows (runs: {', '.join(f'{x:,.0f}' for x in runs)})")
        if train_steps:
            from tfdlrm.training.loop import train
            from tfdlrm.training.spec import TrainSpec

            spec = TrainSpec(model="dlrm", preset="kaggle", data=str(converted), batch_size=train_batch_size,
                             steps_per_epoch=train_steps, epochs=1, optimizer="sgd", lr=0.1, verbose=0)
            trained = train(spec, log=lambda s: None)
            result["training"] = {"preset": "kaggle", "batch_size": train_batch_size, "steps": train_steps,
                                  "examples_per_second": round(trained.examples_per_second)}
            reader = result["reader"].get(f"batch_{train_batch_size}")
            ratio = f"; the reader at batch {train_batch_size} is {reader['rows_per_second'] / trained.examples_per_second:,.1f}x that" \
                if reader else ""
            log(f"training (dlrm, kaggle preset, batch {train_batch_size}, {train_steps} steps): "
                f"{trained.examples_per_second:,.0f} examples/s{ratio}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
