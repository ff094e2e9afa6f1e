"""``bench serving``: latency and throughput of an export's signatures (docs/serving.md)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.serving.export import (
    EXPORT_INFO,
    EXTRA_DIR,
    find_saved_model,
    write_saved_model,
)
from tfdlrm.serving.signatures import ON_INVALID, SIGNATURE_RAW
from tfdlrm.serving.warmup import sample_ids, sample_raw_rows


def _bench_inputs(fn, path: Path, batch: int, count: int) -> list[dict]:
    """``count`` distinct requests of ``batch`` made-up rows for signature ``fn``."""
    from tfdlrm.pipelines.lookup import raw_example

    keys = set(fn.structured_input_signature[1])
    requests = []
    for i in range(count):
        if keys == {"dense", "categorical"}:
            dense, categorical = sample_raw_rows(batch, seed=i)
            requests.append({"dense": tf.constant(dense), "categorical": tf.constant(categorical.astype(bytes))})
        elif keys == {"examples"}:
            dense, categorical = sample_raw_rows(batch, seed=i)
            requests.append({"examples": tf.constant(
                [raw_example(d, c).SerializeToString() for d, c in zip(dense, categorical)])})
        elif keys == {"dense", "sparse"}:
            from tfdlrm.presets import ModelConfig

            info = json.loads((path / EXTRA_DIR / EXPORT_INFO).read_text())
            dense, sparse = sample_ids(ModelConfig.from_dict(info["config"]), batch, seed=i)
            requests.append({"dense": tf.constant(dense), "sparse": tf.constant(sparse)})
        else:
            raise UserError(f"bench serving does not know how to make inputs {sorted(keys)}")
    return requests


def _timed_calls(fn, requests: list[dict], calls: int, warmup: int) -> np.ndarray:
    """Seconds of each of ``calls`` calls (cycling through ``requests``), after ``warmup`` untimed ones."""
    for i in range(warmup):
        next(iter(fn(**requests[i % len(requests)]).values())).numpy()
    seconds = np.empty(calls)
    clock = time.perf_counter
    for i in range(calls):
        start = clock()
        next(iter(fn(**requests[i % len(requests)]).values())).numpy()
        seconds[i] = clock() - start
    return seconds


def bench_serving(saved_model: Optional[str] = None, signature: str = SIGNATURE_RAW, requests: int = 2000,
                  batch_size: int = 1024, batches: int = 30, model: str = "dlrm", preset: str = "kaggle",
                  rows: int = 100_000, log: Callable[[str], None] = print) -> dict:
    """Latency at batch 1 (median, p99) and throughput at ``batch_size`` of a loaded SavedModel.

    ``saved_model``: a version directory or a base directory (its latest version);
    None exports a freshly initialised ``model`` (``preset``, ``rows`` hash buckets per
    table; untrained weights cost the same) into a temporary directory first.  Calls
    go through the loaded signature function in this process: TF Serving's graph,
    without its RPC, JSON and request batching.
    """
    with tempfile.TemporaryDirectory(prefix="tfdlrm-bench-serving-") as tmp:
        if saved_model is None:
            from tfdlrm.pipelines.lookup import RawFeatures
            from tfdlrm.pipelines.vocabulary import CategoricalMapping
            from tfdlrm.presets import get_preset
            from tfdlrm.training.compile import build_model

            if rows < 2:
                raise UserError(f"--rows must be at least 2 (hash buckets + the missing id), got {rows}")
            log(f"exporting a freshly initialised {model} (preset {preset}, {rows:,} rows per table, hashing) ...")
            built = build_model(model, get_preset(preset, rows=rows))
            path = Path(tmp) / "1"
            write_saved_model(path, built, model, RawFeatures(CategoricalMapping.hashing(rows - 1), on_invalid=ON_INVALID),
                              {"note": "untrained, made by bench serving"})
            source = f"a freshly initialised {model} (preset {preset}, {rows:,} rows per table)"
        else:
            path = find_saved_model(saved_model)
            source = str(path)
        start = time.perf_counter()
        loaded = tf.saved_model.load(str(path))
        load_seconds = time.perf_counter() - start
        if signature not in loaded.signatures:
            raise UserError(f"{path} has no signature {signature!r}; it has: {', '.join(sorted(loaded.signatures))}")
        fn = loaded.signatures[signature]
        single = _timed_calls(fn, _bench_inputs(fn, path, 1, 256), requests, warmup=min(200, requests))
        big = _timed_calls(fn, _bench_inputs(fn, path, batch_size, 4), batches, warmup=3)
    result = {
        "saved_model": source,
        "signature": signature,
        "load_seconds": load_seconds,
        "batch_1": {"requests": requests, "median_ms": float(np.median(single) * 1e3),
                    "p99_ms": float(np.percentile(single, 99) * 1e3), "mean_ms": float(single.mean() * 1e3)},
        f"batch_{batch_size}": {"batches": batches, "median_ms": float(np.median(big) * 1e3),
                                "rows_per_second": float(batch_size / np.median(big))},
    }
    return result


def format_bench_serving(result: dict) -> str:
    big_key = next(k for k in result if k.startswith("batch_") and k != "batch_1")
    one, big = result["batch_1"], result[big_key]
    size = int(big_key.split("_")[1])
    return "\n".join([
        f"SavedModel: {result['saved_model']}, signature {result['signature']} (loaded in "
        f"{result['load_seconds']:.1f} s)",
        f"batch 1:     median {one['median_ms']:.3f} ms, p99 {one['p99_ms']:.3f} ms  ({one['requests']:,} requests)",
        f"batch {size:,}: {big['rows_per_second']:,.0f} rows/s  (median {big['median_ms']:.2f} ms a batch, "
        f"{big['batches']} batches)",
    ])
