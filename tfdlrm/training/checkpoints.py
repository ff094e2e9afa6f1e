"""Atomic checkpoints with a record of where training stood, and the metrics' state.

Each checkpoint is written, synced, then named in a JSON record; torn or damaged ones are
skipped for the one before.  See docs/fault-tolerance.md.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError, io_error_text

FORMAT = "tfdlrm.checkpoint"
VERSION = 1
INDEX_FILE = "checkpoint"
KEEP_STEP_CHECKPOINTS = 2


def json_default(value):
    """``json.dumps(default=...)`` for numpy scalars and arrays and tuples."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


class CheckpointStore:
    """The checkpoints of one run directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, keep: Optional[int] = None):
        self.dir = Path(directory)
        self.keep = keep  # None: see prune(); N: the newest N checkpoints and the best epoch's on validation

    # names and files
    def _files(self, name: str) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.name == f"{name}.index" or p.name.startswith(f"{name}.data-"))

    def prefix(self, record: dict) -> str:
        return str(self.dir / record["name"])

    def _read_record(self, path: Path) -> Optional[dict]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
            return None
        name, files = record.get("name"), record.get("files")
        if name != path.name[:-len(".json")] or not isinstance(files, dict) or f"{name}.index" not in files:
            return None
        for file, size in files.items():
            p = self.dir / file
            if not p.is_file() or p.stat().st_size != size:
                return None
        return record

    def scan(self) -> tuple[list[dict], list[str]]:
        """(good records oldest first, names of checkpoints that are incomplete or damaged)."""
        if not self.dir.is_dir():
            return [], []
        good, names = [], set()
        for p in self.dir.iterdir():
            if p.name.endswith(".json"):
                names.add(p.name[:-len(".json")])
            elif p.name.endswith(".index"):
                names.add(p.name[:-len(".index")])
            elif ".data-" in p.name:
                names.add(p.name.split(".data-")[0])
            elif p.name.endswith("_temp") and p.is_dir():
                names.add(p.name[:-len("_temp")])
        bad = []
        for name in sorted(names):
            record = self._read_record(self.dir / f"{name}.json")
            (good.append(record) if record is not None else bad.append(name))
        good.sort(key=lambda r: (r["step"], r["kind"] == "epoch"))
        return good, bad

    def latest(self) -> Optional[dict]:
        good, _ = self.scan()
        return good[-1] if good else None

    def describe_latest(self) -> Optional[str]:
        record = self.latest()
        return None if record is None else f"{self.prefix(record)} (step {record['step']})"

    # writing
    def save(self, model: tf.keras.Model, name: str, record: dict) -> dict:
        """Write ``model``'s checkpoint as ``name`` with ``record`` (see the module docstring)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove(name)  # an older checkpoint of this name, or the remains of a killed save
        try:
            tf.train.Checkpoint(root=model).write(str(self.dir / name))
        except (tf.errors.OpError, OSError) as e:
            self._remove(name)
            raise UserError(f"cannot write checkpoint {self.dir / name}: {io_error_text(e)}") from None
        try:
            files = {}
            for p in self._files(name):
                _fsync(p)
                files[p.name] = p.stat().st_size
            _fsync(self.dir)
            record = dict(record, format=FORMAT, version=VERSION, name=name, files=files,
                          created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            write_atomic(self.dir / f"{name}.json",
                         json.dumps(record, indent=1, allow_nan=False, default=json_default) + "\n")
        except OSError as e:
            self._remove(name)
            raise UserError(f"cannot write checkpoint {self.dir / name}: {io_error_text(e)}") from None
        self.prune()
        return record

    def _remove(self, name: str) -> None:
        """Delete a checkpoint, its record first (so that it never looks complete)."""
        for p in (self.dir / f"{name}.json", self.dir / f"{name}.json.tmp"):
            p.unlink(missing_ok=True)
        for p in self._files(name):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.dir / f"{name}_temp", ignore_errors=True)

    def write_index(self, good: Optional[Sequence[dict]] = None) -> None:
        """TensorFlow's ``checkpoint`` file: every good checkpoint, the newest as the latest."""
        good = self.scan()[0] if good is None else list(good)
        path = self.dir / INDEX_FILE
        if not good:
            path.unlink(missing_ok=True)
            return
        lines = [f'model_checkpoint_path: "{good[-1]["name"]}"']
        lines += [f'all_model_checkpoint_paths: "{r["name"]}"' for r in good]
        write_atomic(path, "\n".join(lines) + "\n")

    def prune(self) -> None:
        """Keep every epoch checkpoint and the newest step checkpoints after the last of them
        (with ``keep`` N: the newest N checkpoints of either kind, and always the best epoch's on
        validation); drop the rest, and anything incomplete."""
        good, bad = self.scan()
        last_epoch = max((r["step"] for r in good if r["kind"] == "epoch"), default=-1)
        steps = [r for r in good if r["kind"] == "step" and r["step"] > last_epoch]
        keep = {r["name"] for r in good if r["kind"] == "epoch"} | {r["name"] for r in steps[-KEEP_STEP_CHECKPOINTS:]}
        if self.keep is not None and good:
            best = best_on_validation(good[-1])
            keep = {r["name"] for r in good[-self.keep:]}
            keep |= {r["name"] for r in good if r["kind"] == "epoch" and r["epoch"] == best}
        kept = [r for r in good if r["name"] in keep]
        self.write_index(kept)  # before deleting: the index never names a missing checkpoint
        for r in good:
            if r["name"] not in keep:
                self._remove(r["name"])
        for name in bad:
            self._remove(name)

    def discard_after(self, record: dict) -> list[str]:
        """Delete every checkpoint newer than ``record`` (good ones that failed to restore, or
        incomplete ones), so that the run continues from ``record``."""
        good, bad = self.scan()
        key = (record["step"], record["kind"] == "epoch")
        newer = [r["name"] for r in good if (r["step"], r["kind"] == "epoch") > key]
        self.write_index([r for r in good if r["name"] not in newer])
        for name in newer + bad:
            self._remove(name)
        return newer + bad

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # reading
    def restore(self, model: tf.keras.Model, record: dict) -> None:
        """Restore ``record``'s checkpoint into ``model`` (weights, slots, step counter); raises
        on a damaged or mismatched checkpoint."""
        status = tf.train.Checkpoint(root=model).read(self.prefix(record))
        status.assert_existing_objects_matched()
        step = int(model.optimizer.iterations.numpy())
        if step != record["step"]:
            raise ValueError(f"its optimizer is at step {step}, its record says {record['step']}")


def best_on_validation(record: dict) -> Optional[int]:
    """The best epoch on validation (1-based) as of ``record``'s checkpoint (the state of the
    run's EpochEvaluation saved in it), or None where the run has no validation split."""
    state = (record.get("state") or {}).get("epochs") or {}
    if not any("val" in e for e in state.get("epochs", [])):
        return None
    return state.get("best_epoch")


def metric_state(model: tf.keras.Model) -> dict:
    """The accumulators of Keras's running epoch metrics (loss, AUC, ...), by metric name."""
    return {m.name: [np.asarray(v.numpy()).tolist() for v in m.variables] for m in model.metrics}


def build_metrics(model: tf.keras.Model) -> None:
    """Create the compiled loss and metric containers now (Keras does it on the first step),
    so that a resumed epoch's running metrics can be set before that step."""
    y = tf.zeros((1, 1))
    with model.distribute_strategy.scope():
        if not model.compiled_loss.built:
            model.compiled_loss.build(y)
        if not model.compiled_metrics.built:
            model.compiled_metrics.build(y, y)


def restore_metric_state(model: tf.keras.Model, state: dict) -> None:
    metrics = {m.name: m for m in model.metrics}
    if set(metrics) != set(state):
        raise ValueError(f"the checkpoint has metrics {sorted(state)}, the model {sorted(metrics)}")
    for name, values in state.items():
        variables = metrics[name].variables
        if len(variables) != len(values):
            raise ValueError(f"metric {name} has {len(variables)} accumulators, the checkpoint {len(values)}")
        for v, value in zip(variables, values):
            value = np.asarray(value, dtype=v.dtype.as_numpy_dtype).reshape(v.shape)
            components = getattr(v, "values", None)
            if components is not None and len(components) > 1:  # summed over replicas: all on the first
                for i, c in enumerate(components):
                    c.assign(value if i == 0 else np.zeros_like(value))
            else:
                v.assign(value)


def non_finite_variable(model: tf.keras.Model) -> Optional[str]:
    """The name of the first weight or optimizer slot holding NaN or infinity, else None."""
    optimizer = getattr(model, "optimizer", None)
    slots = []
    if optimizer is not None:
        try:
            slots = list(optimizer.variables())
        except (AttributeError, TypeError):
            slots = list(getattr(optimizer, "weights", []))
    for v in list(model.trainable_variables) + slots:
        if v.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))):
            return v.name
    return None
