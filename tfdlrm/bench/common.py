"""What every benchmark shares: the machine's description, peak memory, a step clock, work dirs, raw rows."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from tfdlrm.errors import UserError


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
    from tfdlrm.training.memory import proc_bytes

    total = proc_bytes("/proc/meminfo", "MemTotal")
    return None if total is None else round(total / 2**30, 1)


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


def step_clock(warmup: int, steps: int):
    """The one step-timing callback of the benchmarks: after ``warmup`` steps, the wall and
    CPU seconds of each run of ``steps`` steps, in ``.runs`` as ``(wall, cpu)`` pairs.  It
    waits for the steps to finish (reads the optimizer's step counter) before each reading."""
    import tensorflow as tf

    class StepClock(tf.keras.callbacks.Callback):
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

    return StepClock()


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


def make_work_dir(prefix: str, tmp_dir: Optional[str] = None) -> Path:
    """A new temporary directory under ``tmp_dir`` (default: the system's), or a UserError."""
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_dir))
    except OSError as e:
        raise UserError(f"cannot create a temporary directory in {tmp_dir or tempfile.gettempdir()}: "
                        f"{e.strerror or e}") from None
