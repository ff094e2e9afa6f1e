"""The run directory, in one place: what ``--out`` holds and how a run is found again.

    run.json       model name, model config, data description, training spec
    checkpoints/   checkpoints with a record of where training stood (checkpoints.py)
    logs/          TensorBoard event files
    metrics.json   the final exact evaluation, per-epoch metrics, throughput, parameter count (last)
    predictions.npz  held-out labels and probabilities at the best epoch (paired comparisons)

``hold_out_dir`` makes the process the directory's one writer (``.lock``, tfdlrm.locks);
``open_run`` decides between resuming, refusing other settings and starting afresh;
``load_run`` rebuilds the model from ``run.json`` alone.  See docs/fault-tolerance.md.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.locks import hold
from tfdlrm.presets import ModelConfig
from tfdlrm.training.checkpoints import CheckpointStore, first_line, json_default
from tfdlrm.training.compile import build_model

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"

PREDICTIONS_FILE = "predictions.npz"


def save_predictions(path: Path, labels, probabilities) -> None:
    """Held-out ``labels`` and ``probabilities`` (float32) to ``path``, atomically."""
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, labels=np.asarray(labels, np.float32), probabilities=np.asarray(probabilities, np.float32))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def load_predictions(run_dir: str | os.PathLike):
    """``(labels, probabilities)`` saved by a run, or None."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["labels"], data["probabilities"]


def prepare_out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    return out


def hold_out_dir(path: str, held: ExitStack, hint: str = "wait for it to finish, or use another --out") -> Path:
    """Make (``prepare_out_dir``) and lock the output directory ``path`` until ``held`` closes:
    a second ``train`` or ``compare`` into it is refused, naming this process; a killed
    process's lock is no lock (the kernel drops it), so resuming after a kill just takes it.
    A directory made here that is still empty when ``held`` closes is removed again."""
    if not Path(path).exists():
        held.callback(_remove_if_empty, Path(path))
    out = prepare_out_dir(path)
    held.enter_context(hold(out, what=str(out), hint=hint))
    return out


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty (or gone)
        pass


def write_json(path: Path, data: dict) -> None:
    """Write strict JSON (NaN and infinities become null) atomically: temporary file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(_finite(data), indent=2, default=json_default, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def load_run(run_dir: str, mixed_precision: Optional[str] = "run",
             checkpoint: str = "latest") -> tuple[tf.keras.Model, dict]:
    """Rebuild the model of a run directory from its ``run.json`` and restore its latest
    complete checkpoint (a run that diverged never saved its broken state), or the one named
    by ``checkpoint``: ``best`` (the best epoch on validation), ``epoch-N``, ``step-N``
    (tfdlrm/training/choose.py).

    The model is the plain single-device one whatever ``--devices``/``--parallel`` the
    run trained with: checkpoints name variables by role, and a row-split table
    restores whole.  It computes in the run's precision (``mixed_precision="run"``,
    so it predicts exactly what training evaluated), or as asked: ``None`` for
    float32, ``"bf16"``; the weights are float32 either way.
    """
    run = Path(run_dir)
    meta_path = run / RUN_FILE
    if not meta_path.is_file():
        raise UserError(f"{run_dir} is not a training run: {RUN_FILE} not found")
    try:
        meta = json.loads(meta_path.read_text())
        name = meta["model"]
        config = ModelConfig.from_dict(meta["config"], name)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    if mixed_precision == "run":
        mixed_precision = meta.get("mixed_precision")
    from tfdlrm.training.choose import choose_checkpoint

    chosen = choose_checkpoint(run / CHECKPOINT_DIR, checkpoint, run=str(run_dir))  # latest: the newest complete one
    model = build_model(name, config, mixed_precision=None if mixed_precision in (None, "off") else mixed_precision)
    model.load_weights(chosen.prefix).expect_partial()
    return model, meta


# TrainSpec fields that may change when a run resumes: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "out", "verbose", "devices", "parallel", "budget", "cache_dir",
                     "checkpoint_every", "keep", "deterministic", "restart", "xla", "log_every",
                     "steps_per_execution", "threads")


# TrainSpec fields compared by what they resolve to (run.json's top level), not as asked.
RESOLVED = ("mixed_precision",)


# TrainSpec fields that the model config or the data description already compare.
COMPARED_ELSEWHERE = ("preset", "rows", "overrides", "data", "eval_data", "data_seed", "train_examples",
                      "eval_examples", "hash_buckets", "min_frequency")


# Fields of a data description that say where the data is, not what it is.
DATA_LOCATION = ("path", "raw_files", "created_at")


def settings_differences(saved: dict, asked: dict, spec_defaults: Optional[dict] = None) -> list[str]:
    """What differs between a run directory's ``run.json`` (``saved``) and the run now asked
    for (same layout: model, config, data, spec), as ``field: saved != asked`` lines."""
    from tfdlrm.presets import ModelConfig

    out = []
    if saved.get("model") != asked.get("model"):
        out.append(f"model: {saved.get('model')} != {asked.get('model')}")
    try:
        saved_config = ModelConfig.from_dict(saved["config"], saved.get("model"))
    except (KeyError, TypeError, UserError) as e:
        out.append(f"config: unreadable ({e})")
    else:
        out += [line + (f" (--dense-norm {saved_config.dense_norm} continues it)" if line.startswith("dense_norm") else "")
                for line in saved_config.differences(ModelConfig.from_dict(asked["config"], asked.get("model")))]
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
        stopped = metrics.get("stopped_epoch")  # --early-stop ended it: more epochs would not train any further
        if epochs == saved_epochs or (isinstance(stopped, int) and epochs >= stopped):
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
