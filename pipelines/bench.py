"""``python -m tfdlrm bench pipeline``: converter and reader throughput, steady state.

What it measures, in a temporary directory (removed afterwards):

1. A raw Kaggle-format file of ``rows`` rows: real rows (``kaggle_split/train.txt``
   in ``../shared``, or ``--source FILE``) repeated in order until there are
   enough, or generated Criteo-like rows when there is no such file.  Each
   repetition permutes the digits 2-9 and letters a-f (see :func:`write_raw`), so the
   vocabularies grow with the rows as real ones do; ``--verbatim`` repeats the
   rows unchanged (tiny vocabularies).
2. **Converter**: ``convert --format kaggle`` of that file (7-day split), wall time
   from start to finished directory, for the default vocabulary mapping
   (``--min-frequency 1``: a line-count pass, a counting pass, a writing pass) and
   for ``--hash-buckets`` (a line-count pass and a writing pass).  Rows/s = rows
   read / seconds.
3. **Reader**: the training split as the trainer reads it (``train_dataset(batch,
   seed)``: shuffled, decoded, batched), consumed inside TensorFlow with
   ``Dataset.reduce`` so that Python's per-batch cost is not counted; one epoch
   per run, the median of ``repeats`` runs, for each batch size.
4. **Training** (``--train-steps N``, 0 skips): ``tfdlrm.train`` with the
   ``kaggle`` preset on the converted dataset for N steps; the examples/s of
   ``model.fit``, to set beside the reader's rows/s.
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tfdlrm.errors import UserError



def default_source() -> Optional[Path]:
    """``shared/data/criteo/kaggle_split/train.txt`` beside the repository or an ancestor of it."""
    for folder in Path(__file__).resolve().parent.parent.parents:
        candidate = folder / "shared" / "data" / "criteo" / "kaggle_split" / "train.txt"
        if candidate.is_file():
            return candidate
    return None


def generated_lines(n: int, seed: int = 0) -> list[bytes]:
    """``n`` Criteo-format lines with skewed values (used when no real rows are at hand)."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.25).astype(int)
    dense = np.floor(np.exp(rng.normal(1.5, 1.5, (n, 13)))).astype(np.int64)
    dense_missing = rng.random((n, 13)) < 0.2
    cats = (rng.zipf(1.3, (n, 26)) * 2654435761 + np.arange(26) * 40503) % (1 << 32)
    cat_missing = rng.random((n, 26)) < 0.05
    lines = []
    for i in range(n):
        d = [b"" if dense_missing[i, j] else str(dense[i, j]).encode() for j in range(13)]
        c = [b"" if cat_missing[i, j] else b"%08x" % cats[i, j] for j in range(26)]
        lines.append(b"\t".join([str(label[i]).encode(), *d, *c]))
    return lines


def write_raw(path: Path, rows: int, source: Optional[Path], verbatim: bool = False) -> str:
    """Write ``rows`` lines to ``path``; returns what they are.

    Unless ``verbatim``, every repetition after the first maps the digits 2-9 and
    the letters a-f through its own random permutations (digits to digits, letters
    to letters; 0 and 1 stay, so labels stay 0/1): each repetition brings new
    categorical values, so vocabularies grow with the rows as in real logs (dense
    counts change digits and stay integers).
    """
    if source is not None and source.is_file():
        lines = source.read_bytes().splitlines()
        what = f"real rows of {source} ({len(lines):,})"
    else:
        lines = generated_lines(min(rows, 50_000))
        what = "generated Criteo-format rows (no real rows found)"
    if not lines:
        raise UserError(f"{source} has no lines to benchmark with")
    what += " repeated verbatim" if verbatim else " repeated, each repetition with its digits 2-9 and letters a-f permuted"
    block = b"\n".join(lines) + b"\n"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        full, rest = divmod(rows, len(lines))
        for k in range(full + 1):
            data = block if k < full else b"".join(line + b"\n" for line in lines[:rest])
            if k and not verbatim:
                to = bytes(rng.permutation(list(b"23456789")).tolist() + rng.permutation(list(b"abcdef")).tolist())
                data = data.translate(bytes.maketrans(b"23456789abcdef", to))
            f.write(data)
    return what


def _rows_per_second_reduce(dataset) -> tuple[int, float]:
    import tensorflow as tf

    start = time.perf_counter()
    rows = dataset.reduce(tf.constant(0, tf.int64),
                          lambda n, batch: n + tf.cast(tf.shape(batch[1])[0], tf.int64)).numpy()
    return int(rows), time.perf_counter() - start


def make_work_dir(prefix: str, tmp_dir: Optional[str] = None) -> Path:
    """A new temporary directory under ``tmp_dir`` (default: the system's), or a UserError."""
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_dir))
    except OSError as e:
        raise UserError(f"cannot create a temporary directory in {tmp_dir or tempfile.gettempdir()}: "
                        f"{e.strerror or e}") from None


def bench_pipeline(rows: int = 2_000_000, source: Optional[str] = None, batch_sizes: Sequence[int] = (128, 1024, 4096),
                   repeats: int = 3, train_steps: int = 0, train_batch_size: int = 128, workers: int = 2,
                   verbatim: bool = False, tmp_dir: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark (see the module docstring); returns the figures as a dict."""
    from pipelines.criteo import ConvertSpec, convert
    from pipelines.reader import CriteoDataset

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
            from tfdlrm.training import TrainSpec, train

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
