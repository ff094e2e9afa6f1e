"""``bench parallel``: step time and embedding bytes per device of a parallel mode (docs/parallelism.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from tfdlrm.bench.common import step_clock
from tfdlrm.errors import UserError
from tfdlrm.parallel.plan import BYTES_PER_VALUE
from tfdlrm.parallel.setup import configure_devices, make_parallel


@dataclass
class BenchRow:
    devices: int
    mode: str
    step_ms: float
    examples_per_second: float
    bytes_per_device: dict


def bench_parallel(preset: str = "kaggle", rows: Optional[int] = 100_000, device_counts: Iterable[int] = (1, 2, 4),
                   batch_size: int = 2048, steps: int = 20, warmup: int = 3, mode: str = "hybrid",
                   model_name: str = "dlrm", optimizer: str = "sgd", budget: Optional[int] = None,
                   overrides: Optional[dict] = None, log=print) -> list[BenchRow]:
    """Step time and embedding bytes per device of ``mode`` over each device count.

    Every count is a prefix of the same logical devices in this process.  On a CPU
    they share its cores: the figures say what the placement costs, not a speed-up.
    """
    import tensorflow as tf

    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.presets import get_preset
    from tfdlrm.training.compile import build_model, compile_model

    counts = sorted(set(int(c) for c in device_counts))
    if not counts or counts[0] <= 0:
        raise UserError(f"device counts must be positive, got {list(device_counts)}")
    if mode not in ("hybrid", "mirrored"):
        raise UserError(f"bench parallel compares hybrid or mirrored, got {mode!r}")
    all_devices = configure_devices(max(counts))
    config = get_preset(preset, rows=rows, **(overrides or {}))
    source = open_data("random", config, train_examples=batch_size * (steps + warmup), eval_examples=batch_size)
    data = source.train_dataset(batch_size, seed=1).take(steps + warmup).cache()
    for _ in data:  # generate once, outside the timing
        pass
    out = []
    for count in counts:
        names = all_devices[:count]
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(1)
        setup = make_parallel(mode, names, config, budget, model_name)
        with setup.scope():
            model = build_model(model_name, config)
            compile_model(model, optimizer, 0.01, metrics=False)
        setup.attach(model)
        clock = step_clock(warmup, steps)
        model.fit(data, epochs=1, verbose=0, callbacks=[clock])
        step = clock.runs[0][0] / steps
        if setup.plan is not None:
            per_device = setup.plan.bytes_per_device()
        else:
            replicated = sum(config.table_rows) * config.embedding_dim * BYTES_PER_VALUE
            per_device = {d: replicated for d in names}
        row = BenchRow(count, mode, step * 1000, batch_size / step, per_device)
        log(f"{count} device(s): {row.step_ms:.1f} ms/step, {row.examples_per_second:,.0f} examples/s")
        out.append(row)
    return out


def format_bench(rows: Sequence[BenchRow]) -> str:
    lines = [f"{'devices':>7} {'mode':8} {'ms/step':>9} {'examples/s':>11}  embedding bytes per device"]
    for r in rows:
        per = ", ".join(f"{d.rsplit('/', 1)[-1].replace('device:', '')} {b / 2**20:,.1f} MiB"
                        for d, b in r.bytes_per_device.items())
        lines.append(f"{r.devices:>7} {r.mode:8} {r.step_ms:>9.1f} {r.examples_per_second:>11,.0f}  {per}")
    lines.append("logical CPU devices share the same cores: this reports what placement costs, not a speed-up.")
    return "\n".join(lines)
