"""Checkpoints that a killed training run resumes from (README, Fault tolerance).

A run directory's ``checkpoints/`` holds::

    epoch-002.index                   the model's tf.train.Checkpoint: weights, optimizer slots and the
    epoch-002.data-00000-of-00001     optimizer's step counter (what ``model.save_weights`` writes)
    epoch-002.json                    its record: where training stood (epoch, batch, step, data
                                      position and seed), the running epoch metrics, the history so
                                      far, training seconds, learning-curve points, and the size of
                                      every file above
    step-00000150.*                   the same every ``--checkpoint-every`` steps (the newest two kept)
    checkpoint                        TensorFlow's index, so ``tf.train.latest_checkpoint`` names the
                                      newest good checkpoint

A checkpoint counts only once its record exists and every file it lists has the
listed size.  Saving goes: drop the old record of that name, write the TensorFlow
files (TensorFlow writes the data into ``NAME_temp/`` and renames it), fsync them,
write the record (temporary file, fsync, rename), then rewrite the index (same
way).  A process killed at any point leaves either the new checkpoint complete or
no record for it, so resuming takes the previous one; TensorFlow's per-tensor
checksums catch a damaged data file on restore, and the previous checkpoint is
tried next.

The data a run sees is one stream of batches: pass ``p`` over the training split
is shuffled with seed ``pass_seed(seed, p)``, and the stream is passes ``0, 1, ...``
end to end (an epoch is one pass, or ``--steps-per-epoch`` batches of the stream).
The position in it is the number of batches trained, so a resumed run rebuilds
the stream from that batch on and sees exactly the batches an uninterrupted run
would.  Nothing else random happens after initialisation (which the restore
replaces), so (seed, position) is all the random state there is.
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
_SEED_MULTIPLIER = 1_000_003
_SEED_MODULUS = 2**31 - 1

# TrainSpec fields that may change when a run resumes: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "out", "verbose", "devices", "parallel", "budget", "cache_dir",
                     "checkpoint_every", "deterministic", "restart", "xla")
# TrainSpec fields compared by what they resolve to (run.json's top level), not as asked.
RESOLVED = ("mixed_precision",)
# TrainSpec fields that the model config or the data description already compare.
COMPARED_ELSEWHERE = ("preset", "rows", "overrides", "data", "eval_data", "data_seed", "train_examples",
                      "eval_examples", "hash_buckets", "min_frequency")
# Fields of a data description that say where the data is, not what it is.
DATA_LOCATION = ("path", "raw_files", "created_at")


# -- the data stream ----------------------------------------------------------------------------------------------
def pass_seed(seed, p):
    """The shuffling seed of pass ``p`` over the training split (Python ints or int64 tensors)."""
    return (seed * _SEED_MULTIPLIER + p) % _SEED_MODULUS


def training_stream(source, batch_size: int, seed: int, start: int, total: int) -> tf.data.Dataset:
    """Batches ``start`` .. ``total - 1`` of the run's stream of training batches.

    Every pass is built the same way (inside ``flat_map``), whether the run starts at
    batch 0 or resumes mid-pass, so the batches do not depend on where it started.
    """
    per_pass = source.train_batches(batch_size)
    if total <= start:
        raise ValueError(f"nothing to train: start {start} >= total {total}")
    first, offset = divmod(start, per_pass)
    last = (total - 1) // per_pass
    base = tf.constant(seed, tf.int64)

    def one_pass(p):
        data = source.train_dataset(batch_size, seed=pass_seed(base, p))
        return data.skip(tf.where(tf.equal(p, first), tf.constant(offset, tf.int64), tf.constant(0, tf.int64)))

    return tf.data.Dataset.range(first, last + 1).flat_map(one_pass).take(total - start).prefetch(tf.data.AUTOTUNE)


class StartAt:
    """Where ``model.fit`` starts.  tf_keras's fit asks ``model._training_state`` (the hook its
    BackupAndRestore uses) for the initial epoch and step, and runs the rest of that epoch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch, initial_epoch, mode=None):
        return self.epoch, self.batch

    def attach(self, model) -> None:
        if not hasattr(model, "_maybe_load_initial_counters_from_ckpt") or not hasattr(model, "_training_state"):
            raise RuntimeError("this tf_keras has no hook to start model.fit mid-epoch")
        model._training_state = self  # noqa: SLF001

    @staticmethod
    def detach(model) -> None:
        if isinstance(getattr(model, "_training_state", None), StartAt):
            model._training_state = None  # noqa: SLF001


# -- the store ----------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


class CheckpointStore:
    """The checkpoints of one run directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

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
        """Keep every epoch checkpoint and the newest step checkpoints after the last of them;
        drop the rest, and anything incomplete."""
        good, bad = self.scan()
        last_epoch = max((r["step"] for r in good if r["kind"] == "epoch"), default=-1)
        steps = [r for r in good if r["kind"] == "step" and r["step"] > last_epoch]
        keep = {r["name"] for r in good if r["kind"] == "epoch"} | {r["name"] for r in steps[-KEEP_STEP_CHECKPOINTS:]}
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


def json_default(value):
    """``json.dumps(default=...)`` for numpy scalars and arrays and tuples."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- the running epoch metrics -------------------------------------------------------------------------------------
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


# -- the callback --------------------------------------------------------------------------------------------------
class RunCheckpoints(tf.keras.callbacks.Callback):
    """Save the run every ``every`` steps (None: never mid-epoch) and at each epoch end.

    Never saves a state with a non-finite loss, weight or slot: it raises
    :class:`~tfdlrm.callbacks.TrainingDiverged` instead.  ``history`` is the whole run's
    (earlier processes' epochs included).  ``state_of`` maps a name to an object with
    ``state()`` (saved in each record) for other callbacks to resume from.
    """

    _supports_tf_logs = True

    def __init__(self, store: CheckpointStore, every: Optional[int], steps_per_epoch: int, batches_per_pass: int,
                 seed: int, start_epoch: int = 0, start_batch: int = 0, history: Optional[dict] = None,
                 metrics: Optional[dict] = None, extra: Optional[dict] = None, state_of: Optional[dict] = None,
                 clock=None, identity: Optional[dict] = None):
        super().__init__()
        self.store, self.every = store, every
        self.steps_per_epoch, self.batches_per_pass, self.seed = steps_per_epoch, batches_per_pass, seed
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self._resume_metrics = metrics
        self.extra = dict(extra or {})
        self.state_of = dict(state_of or {})
        self.clock = clock
        self.identity = dict(identity or {})
        self.epoch, self.batch = start_epoch, start_batch
        self.saved: list[str] = []

    def _implements_train_batch_hooks(self):
        return self.every is not None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.batch = self.start_batch if epoch == self.start_epoch else 0
        if epoch == self.start_epoch and self._resume_metrics is not None:
            restore_metric_state(self.model, self._resume_metrics)  # after fit's reset of the metrics
            self._resume_metrics = None

    def on_train_batch_end(self, batch, logs=None):
        self.batch = batch + 1
        step = self.epoch * self.steps_per_epoch + self.batch
        if self.every and step % self.every == 0 and self.batch < self.steps_per_epoch:
            self._save("step", f"step-{step:08d}", step, self.epoch, self.batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        step = (epoch + 1) * self.steps_per_epoch
        self._save("epoch", f"epoch-{epoch + 1:03d}", step, epoch + 1, 0, logs)

    def _save(self, kind, name, step, epoch, batch, logs):
        from tfdlrm.callbacks import TrainingDiverged

        started = time.perf_counter()
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise TrainingDiverged(step, epoch + (kind == "step"), self.store.describe_latest())
        bad = non_finite_variable(self.model)
        if bad is not None:
            raise TrainingDiverged(step, epoch + (kind == "step"), self.store.describe_latest(),
                                   what=f"{bad} became NaN or infinite")
        position = epoch * self.steps_per_epoch + batch
        record = dict(self.identity)
        record.update({
            "kind": kind, "step": step, "epoch": epoch, "batch": batch,
            "data": {"position": position, "batches_per_pass": self.batches_per_pass,
                     "pass": position // self.batches_per_pass, "offset": position % self.batches_per_pass,
                     "seed": self.seed, "pass_seed": pass_seed(self.seed, position // self.batches_per_pass)},
            "metrics": metric_state(self.model) if kind == "step" else None,
            "history": self.history,
            "extra": self.extra,
        })
        record["state"] = {key: obj.state() for key, obj in self.state_of.items()}
        self.store.save(self.model, name, record)
        self.saved.append(name)
        if self.clock is not None:
            self.clock.exclude(time.perf_counter() - started)


def settings_differences(saved: dict, asked: dict, spec_defaults: Optional[dict] = None) -> list[str]:
    """What differs between a run directory's ``run.json`` (``saved``) and the run now asked
    for (same layout: model, config, data, spec), as ``field: saved != asked`` lines."""
    from tfdlrm.presets import ModelConfig

    out = []
    if saved.get("model") != asked.get("model"):
        out.append(f"model: {saved.get('model')} != {asked.get('model')}")
    try:
        saved_config = ModelConfig.from_dict(saved["config"])
    except (KeyError, TypeError, UserError) as e:
        out.append(f"config: unreadable ({e})")
    else:
        out += saved_config.differences(ModelConfig.from_dict(asked["config"]))
    for key in RESOLVED:  # runs from before a setting existed ran with it off
        if key in asked and saved.get(key, "off") != asked[key]:
            out.append(f"{key}: {saved.get(key, 'off')} != {asked[key]}")
    for key, value in asked.get("data", {}).items():
        if key not in DATA_LOCATION and saved.get("data", {}).get(key) != value:
            out.append(f"data {key}: {_short(saved.get('data', {}).get(key))} != {_short(value)}")
    defaults = spec_defaults or {}
    saved_spec = json.loads(json.dumps(saved.get("spec", {}), default=json_default))
    asked_spec = json.loads(json.dumps(asked.get("spec", {}), default=json_default))
    for key, value in asked_spec.items():
        if key in RESUMABLE_CHANGES or key in COMPARED_ELSEWHERE or key in RESOLVED:
            continue
        theirs = saved_spec.get(key, defaults.get(key))
        if theirs != value:
            out.append(f"{key}: {_short(theirs)} != {_short(value)}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- a run directory, before training ------------------------------------------------------------------------------
class RunStatus:
    """What a run directory holds for the run asked: ``finished`` (its metrics.json) when it
    is done, else ``candidates``, the good checkpoints to resume from, newest first (none:
    train from scratch)."""

    def __init__(self, store: CheckpointStore, finished: Optional[dict] = None, candidates: Sequence[dict] = ()):
        self.store, self.finished, self.candidates = store, finished, list(candidates)


def open_run(out: Path, asked: dict, *, restart: bool, total_steps: int, spec_defaults: dict,
             run_file: str, metrics_file: str, checkpoint_dir: str, logs_dir: str) -> RunStatus:
    """Decide how a training run into ``out`` starts.

    ``asked`` is the run.json of the run asked for.  A directory without a run starts
    from scratch; a run of other settings is refused, naming the differences; a
    finished run is reported as such; otherwise the run resumes from its newest good
    checkpoint.  ``restart`` discards whatever run is there.
    """
    store = CheckpointStore(out / checkpoint_dir)
    run_path, metrics_path = out / run_file, out / metrics_file

    def from_scratch() -> RunStatus:
        metrics_path.unlink(missing_ok=True)
        store.clear()
        shutil.rmtree(out / logs_dir, ignore_errors=True)
        return RunStatus(store)

    if restart:
        run_path.unlink(missing_ok=True)
        return from_scratch()
    if not run_path.is_file():
        if metrics_path.exists() or store.scan()[0]:
            raise UserError(f"{out} holds checkpoints or results but no {run_file}: use another --out, or "
                            f"--restart to discard them")
        return from_scratch()
    try:
        saved = json.loads(run_path.read_text())
        saved_epochs = int(saved["spec"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{run_path} is unreadable ({first_line(e)}): use another --out, or --restart to "
                        f"discard the run") from None
    differences = settings_differences(saved, asked, spec_defaults)
    if differences:
        more = f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
        raise UserError(f"{out} holds a run with other settings (saved != asked): {'; '.join(differences[:4])}"
                        f"{more}; use another --out, or --restart to discard that run")
    epochs = int(asked["spec"]["epochs"])
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{metrics_path} is unreadable ({first_line(e)}): --restart trains the run "
                            f"again") from None
        if metrics.get("diverged"):
            raise UserError(f"{out} diverged earlier ({metrics['diverged']}); --restart trains it again")
        if epochs == saved_epochs:
            return RunStatus(store, finished=metrics)
    good, _ = store.scan()
    if good and good[-1]["step"] > total_steps:
        raise UserError(f"{out} has trained {good[-1]['step']:,} steps, more than --epochs {epochs} takes "
                        f"({total_steps:,} steps): raise --epochs, or --restart to train again")
    if good:
        identity = {"model": good[-1].get("model"), "config": good[-1].get("config")}
        differences = settings_differences(identity, {"model": asked["model"], "config": asked["config"]})
        if differences:
            raise UserError(f"checkpoint {store.prefix(good[-1])} is of another model (checkpoint != asked): "
                            f"{'; '.join(differences[:4])}; use another --out, or --restart to discard it")
        return RunStatus(store, candidates=list(reversed(good)))
    return from_scratch()
