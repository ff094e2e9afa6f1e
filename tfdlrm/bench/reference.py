"""The PyTorch reference (facebookresearch/dlrm) run beside tfdlrm, on this machine, in the same run.

``bench fit --reference DIR --torch-python PY`` trains the reference's own ``DLRM_Net`` on exactly
the rows ``train`` trains on (dumped to an ``.npz`` as tfdlrm's reader yields them;
``torch_reference.py``); ``bench train --reference ...`` runs the reference's own
``dlrm_s_pytorch.py --data-generation=random`` with the preset's tables and MLPs.  Nothing of the
reference is part of tfdlrm: the checkout and a Python with PyTorch are the user's (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from tfdlrm.errors import UserError

DRIVER = Path(__file__).with_name("torch_reference.py")
SCRIPT = "dlrm_s_pytorch.py"


@dataclass(frozen=True)
class Reference:
    """A checkout of facebookresearch/dlrm and the Python (with PyTorch) that runs it."""

    checkout: str
    python: str

    def check(self) -> "Reference":
        """A UserError naming what is missing: the script in the checkout, the Python, or PyTorch,
        NumPy and the reference's own imports in that Python."""
        if not (Path(self.checkout) / SCRIPT).is_file():
            raise UserError(f"--reference {self.checkout}: no {SCRIPT} there (a checkout of facebookresearch/dlrm)")
        python = shutil.which(self.python) or self.python  # a name on the PATH, as subprocess would find it
        if not os.access(python, os.X_OK) or Path(python).is_dir():
            raise UserError(f"--torch-python {self.python}: not an executable Python")
        probe = ("import contextlib, io, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[:1]\n"
                 "with contextlib.redirect_stdout(io.StringIO()): import dlrm_s_pytorch\n"
                 "import torch; print(torch.__version__)")
        done = self._run([self.python, "-c", probe, os.path.abspath(self.checkout)], timeout=300)
        if done.returncode != 0:
            raise UserError(f"--torch-python {self.python} cannot import the reference's {SCRIPT}: "
                            f"{_last_line(done.stderr)} (it needs torch, numpy, scikit-learn, tqdm, tensorboard)")
        return self

    def fit(self, npz: str, batch_size: int, lr: float, config, threads: Optional[int] = None) -> dict:
        """One epoch of ``DLRM_Net`` over the ``.npz``'s training rows (torch_reference.py's JSON)."""
        command = [self.python, str(DRIVER), "--checkout", os.path.abspath(self.checkout), "--npz", npz,
                   "--batch-size", str(batch_size), "--lr", str(lr),
                   "--bottom-mlp", "-".join(map(str, config.bottom_mlp)),
                   "--top-mlp", "-".join(map(str, config.top_mlp))]
        if threads:
            command += ["--threads", str(threads)]
        command += [flag for flag in reference_table_flags(config) if flag not in ("--qr-flag", "--md-flag")]
        done = self._run(command)
        if done.returncode != 0:
            raise UserError(f"the reference's run failed (exit {done.returncode}): {_last_line(done.stderr)}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def floor(self, config, batch_size: int) -> dict:
        """PyTorch's MLP-only floor for ``config``'s MLPs (torch_reference.py --floor), in this Python."""
        done = self._run([self.python, str(DRIVER), "--floor", "--batch-size", str(batch_size),
                          "--tables", str(config.num_tables), "--bottom-mlp", "-".join(map(str, config.bottom_mlp)),
                          "--top-mlp", "-".join(map(str, config.top_mlp))])
        if done.returncode != 0:
            raise UserError(f"PyTorch's MLP floor failed (exit {done.returncode}): {_last_line(done.stderr)}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def random_step(self, config, batch_size: int, batches: int = 60, lr: float = 0.1) -> dict:
        """The reference's own script on its random data: ms a step (median of its 10-batch
        windows after the first), its command and every window."""
        if config.interaction != "dot":
            raise UserError("the reference's random benchmark here is for the dot interaction")
        command = [self.python, SCRIPT, f"--arch-sparse-feature-size={config.embedding_dim}",
                   f"--arch-mlp-bot={'-'.join(map(str, config.bottom_mlp))}",
                   f"--arch-mlp-top={'-'.join(map(str, config.top_mlp))}",
                   f"--arch-embedding-size={'-'.join(map(str, config.table_rows))}",
                   "--arch-interaction-op=dot", "--data-generation=random",
                   f"--num-indices-per-lookup={config.ids_per_lookup}", "--num-indices-per-lookup-fixed=1",
                   f"--mini-batch-size={batch_size}", f"--num-batches={batches}", f"--learning-rate={lr}",
                   "--loss-function=bce", "--print-freq=10", "--print-time", "--nepochs=1"]
        if config.self_interaction:
            command.append("--arch-interaction-itself")
        command += reference_table_flags(config)
        done = self._run(command, cwd=self.checkout)
        windows = [float(m) for m in re.findall(r"Finished training it \d+/\d+ of epoch \d+, ([0-9.]+) ms/it",
                                                done.stdout)]
        if done.returncode != 0 or len(windows) < 2:
            raise UserError(f"the reference's random run failed (exit {done.returncode}): "
                            f"{_last_line(done.stderr or done.stdout)}")
        ms = statistics.median(windows[1:])
        return {"ms_per_step": round(ms, 2), "examples_per_second": round(batch_size * 1000 / ms),
                "windows_ms_per_step": windows, "command": " ".join(command[1:])}

    @staticmethod
    def _run(command, cwd=None, timeout=None):
        try:
            return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"cannot run {command[0]}: {e}") from None


def reference_table_flags(config) -> list:
    """The reference's own flags for the config's QR or MD tables (tfdlrm/tables.py), so both sides
    train the same tables; refused where the reference cannot: MD with a threshold (its --md-flag
    crashes on tables at or below it), a --memory-budget (it has none)."""
    if config.memory_budget:
        raise UserError("the reference has no --memory-budget: give --qr-collisions and --qr-threshold")
    flags = []
    if config.qr_collisions:
        flags += ["--qr-flag", f"--qr-collisions={config.qr_collisions}", f"--qr-operation={config.qr_operation}",
                  f"--qr-threshold={config.qr_threshold}"]
    if config.md_temperature:
        if config.md_threshold != 0 or min(config.table_rows) <= config.md_threshold:
            raise UserError("the reference's --md-flag crashes on tables at or below its threshold: use "
                            "--md-threshold 0 for a side-by-side run")
        flags += ["--md-flag", f"--md-temperature={config.md_temperature}", f"--md-threshold={config.md_threshold}"]
        if config.md_round_dims:
            flags.append("--md-round-dims")
    return flags


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def dump_rows(source, path: str, batch_size: int = 4096) -> dict:
    """Write ``source``'s training split (file order) and held-out split, exactly as tfdlrm's reader
    yields them, with the table sizes, to one ``.npz``; returns the row counts."""
    def collect(dataset):
        dense, sparse, labels = [], [], []
        for x, y in dataset:
            dense.append(x["dense"].numpy())
            sparse.append(x["sparse"].numpy())
            labels.append(y.numpy())
        return np.concatenate(dense), np.concatenate(sparse), np.concatenate(labels)

    if source.config.ids_per_lookup != 1:
        raise UserError("the reference runs here take one id per categorical feature (no bags)")
    train = collect(source.train_dataset(batch_size))  # no seed: the stored order
    held_out = collect(source.eval_dataset(batch_size))
    np.savez(path, tr_dense=train[0], tr_sparse=train[1], tr_y=train[2], te_dense=held_out[0],
             te_sparse=held_out[1], te_y=held_out[2], rows=np.array(source.config.table_rows))
    return {"train_rows": int(len(train[2])), "held_out_rows": int(len(held_out[2])),
            "table_rows": int(sum(source.config.table_rows))}
