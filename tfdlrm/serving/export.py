"""``tfdlrm export``: a run's checkpoint -> ``saved_models/<model>/<version>/`` for TF Serving.

Versions appear atomically (written to a partial directory, then renamed); ``--force``
replaces one in a single exchange, so the base never lacks it.  One export writes a base at a
time (its ``.lock``), reading the run under a shared lock (a run being trained is refused); it
first finishes or rolls back a replacement a kill interrupted and deletes killed exports'
partial directories.  See docs/serving.md and docs/fault-tolerance.md.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.locks import hold
from tfdlrm.publish import make_partial, recover, replace_dir
from tfdlrm.serving.signatures import (
    SIGNATURE_IDS,
    SIGNATURE_RAW,
    ServingModule,
    _shape,
    describe_signatures,
    serving_features,
    signature_functions,
)
from tfdlrm.serving.warmup import WARMUP_BATCH_SIZES, WARMUP_FILE, warmup_requests

EXPORT_ROOT = "saved_models"
EXTRA_DIR = "assets.extra"
EXPORT_INFO = "export.json"
EXPORT_FORMAT = "tfdlrm.serving"
EXPORT_FORMAT_VERSION = 1
_VERSION = re.compile(r"^\d+$")


def write_saved_model(path: Path, model: tf.keras.Model, model_name: str, features=None,
                      info: Optional[dict] = None, extra_files: Optional[dict] = None) -> dict:
    """Write the SavedModel of ``model`` into the (new or empty) directory ``path``:
    signatures, warm-up requests, ``assets.extra/export.json`` (``info`` added) and
    ``extra_files`` (name -> bytes).  Returns export.json's content."""
    functions = signature_functions(model, features)
    module = ServingModule(model, features)
    tf.saved_model.save(module, str(path), signatures=functions)
    extra = Path(path) / EXTRA_DIR
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for log in warmup_requests(model_name, functions, model.config, features):
            writer.write(log.SerializeToString())
    description = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "model": model_name,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tensorflow": tf.__version__,
        "config": model.config.to_dict(),
        **(info or {}),
        "signatures": describe_signatures(functions),
        "serving_default": SIGNATURE_RAW if features is not None else SIGNATURE_IDS,
        "choices": _choices(features),
        "warmup_requests": len(WARMUP_BATCH_SIZES) * (len(functions) - (features is None)),
    }
    for name, data in (extra_files or {}).items():
        (extra / name).write_bytes(data)
    (extra / EXPORT_INFO).write_text(json.dumps(description, indent=2) + "\n")
    return description


def _choices(features) -> dict:
    """How the raw signatures treat odd values (export.json)."""
    from tfdlrm.pipelines.spec import TabularFeatures

    if isinstance(features, TabularFeatures):
        return {"categorical_missing": "an empty string -> id 0; a value not in the vocabulary -> id 1",
                "multi_hot": "split at the separator, empty tokens dropped, the first `width` ids kept "
                             "(features.columns in the manifest); an empty string is an empty bag",
                "dense_missing": "NaN, +inf, -inf -> 0 (log1p columns: negative values -> 0 too)"}
    return {
        "categorical_invalid": "neither empty nor 8 hex digits -> the missing id" if features else None,
        "categorical_case": "upper and lower case hex map alike" if features else None,
        "dense_missing": "NaN, +inf, -inf and negative counts -> 0 (as a missing value)" if features else None,
    }


@dataclass
class Export:
    """What :func:`export_run` wrote."""

    path: Path
    version: int
    model: str
    raw_features: bool
    description: dict = field(repr=False, default_factory=dict)
    run_dir: str = ""
    checkpoint: str = ""
    checkpoint_label: str = ""  # its name, and whether it is the best epoch on validation

    def summary(self) -> str:
        label = self.checkpoint_label or Path(self.checkpoint).name
        lines = [f"exported {self.model} from {self.run_dir} ({label}) to {self.path}"
                 + (f" ({self.description['saved_model_bytes']:,} bytes)" if "saved_model_bytes" in self.description
                    else "")]
        quantized = self.description.get("quantized_embeddings")
        if quantized:
            lines.append(f"  embedding tables {quantized['bits']}-bit row-wise: {quantized['float_table_bytes']:,} "
                         f"bytes as float32 -> {quantized['quantized_table_bytes']:,} bytes "
                         f"({quantized['float_table_bytes'] / quantized['quantized_table_bytes']:.1f}x smaller)")
        for name, sig in self.description["signatures"].items():
            if name == SIGNATURE_RAW and not self.raw_features:
                lines.append(f"  {name:16} = {SIGNATURE_IDS}")
                continue
            ins = ", ".join(f"{k} {v['dtype']} {_shape(v['shape'])}" for k, v in sig["inputs"].items())
            outs = ", ".join(sig["outputs"])
            lines.append(f"  {name:16} {ins} -> {outs}")
        if not self.raw_features:
            lines.append(f"note: the run trained on generated data ({self.description.get('data_kind')}), which "
                         f"has no raw-feature mapping: serving_default takes mapped ids (dense, sparse), as "
                         f"'{SIGNATURE_IDS}' does; there is no raw or tf.Example signature")
        return "\n".join(lines)


def versions(base: Path) -> list[int]:
    """The integer version directories under ``base``, ascending."""
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if _VERSION.match(p.name) and p.is_dir())


def _prepare_base(base: Path) -> None:
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write exports to {base}: {e.strerror or e}") from None


def choose_version(base: Path, version: Optional[int], force: bool) -> int:
    """``version``, or the next free number; an existing one only with ``force``."""
    existing = versions(base)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise UserError(f"--version must be an integer >= 0, got {version!r}")
    if (base / str(version)).exists() and not force:
        free = (existing[-1] + 1) if existing else 1
        raise UserError(f"{base / str(version)} exists; --force replaces it (or leave out --version for the next "
                        f"free number, {free})")
    return int(version)


def _publish(tmp: Path, final: Path, force: bool) -> None:
    """Move the finished export into place: one rename, or for a replaced version one
    exchange of the two directories (two renames where the file system cannot exchange:
    ``.N.replaced-*``, which the next export puts right if a kill comes between them)."""
    try:
        if not final.exists():
            os.rename(tmp, final)
        elif not force:
            raise UserError(f"{final} appeared while exporting; --force replaces it")
        else:
            replace_dir(tmp, final, final.with_name(tmp.name.replace(".partial-", ".replaced-", 1)))
    except OSError as e:
        raise UserError(f"cannot move the export into {final}: {e.strerror or e}") from None


def make_partial_dir(base: Path, version: int) -> Path:
    """A new ``base/.<version>.partial-PID-HEX`` directory (TF Serving ignores names that are
    not numbers), made with the process's umask (a server running as another user must read
    the version it is renamed into)."""
    return make_partial(base, str(version))[0]


def is_complete(version_dir: Path) -> bool:
    """Whether an export directory was written to the end (export.json is written last)."""
    return (version_dir / "saved_model.pb").is_file() and (version_dir / EXTRA_DIR / EXPORT_INFO).is_file()


def recover_base(base: Path) -> list[str]:
    """Under the base's lock, every partial or replaced directory is a killed export's: finish
    (or roll back) an interrupted replacement, delete the rest.  Returns what it did."""
    return recover(base, r"\d+", is_complete, partial="partial", aside="replaced", stale=lambda path: True)


def _read_run(run: Path) -> dict:
    from tfdlrm.training.rundir import RUN_FILE

    if not run.is_dir():
        raise UserError(f"run directory {run} not found (give the --out of a train run)")
    meta_path = run / RUN_FILE
    if not meta_path.is_file():
        raise UserError(f"{run} is not a training run: {RUN_FILE} not found")
    try:
        meta = json.loads(meta_path.read_text())
        meta["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    return meta


def default_base(model_name: str) -> Path:
    return Path(EXPORT_ROOT) / model_name


def check_destination(run_dir: str, out: Optional[str] = None, version: Optional[int] = None,
                      force: bool = False, model_name: Optional[str] = None, create: bool = True
                      ) -> tuple[Path, int]:
    """Where an export of ``run_dir`` goes, ``(base, version)``: the version free (or
    ``force``) and, with ``create``, the base directory made and checked writable
    (``train --export`` calls this before training)."""
    if model_name is None:
        model_name = _read_run(Path(run_dir))["model"]
    base = Path(out) if out else default_base(model_name)
    if base.exists() and not base.is_dir():
        raise UserError(f"cannot write exports to {base}: not a directory")
    chosen = choose_version(base, version, force)
    if create:
        _prepare_base(base)
    return base, chosen


def export_run(run_dir: str, out: Optional[str] = None, version: Optional[int] = None, force: bool = False,
               dataset: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
               checkpoint: str = "latest", quantize_bits: Optional[int] = None) -> Export:
    """Export the run in ``run_dir`` to ``out/<version>`` (default ``saved_models/<model>/<next>``):
    its newest checkpoint, or ``checkpoint`` (``best``, the best epoch on validation; ``epoch-N``;
    ``step-N``: tfdlrm/training/choose.py); with ``quantize_bits`` (8 or 4) the embedding tables stored
    row-wise quantized (tfdlrm/layers/quantized.py)."""
    if quantize_bits not in (None, 8, 4):
        raise UserError(f"--quantize-embeddings takes 8 or 4 bits, got {quantize_bits}")
    run = Path(run_dir)
    meta = _read_run(run)
    base, chosen = check_destination(run_dir, out, version, force, meta["model"], create=False)
    with ExitStack() as held:
        # Read-only: shared with other exports, refused while a train writes the run.
        held.enter_context(hold(run, shared=True, what=f"run directory {run}",
                                hint="export it once training has finished"))
        return _export(run_dir, base, version, force, dataset, log, held, checkpoint, quantize_bits)


# Measured: exporting 1.55 GiB of tables (kaggle widths, 26 x 1M rows) peaked at 3.9 GiB RSS, 0.6 GiB of
# it TensorFlow: the model whole, the checkpoint's values read into it, and the SavedModel written.
EXPORT_TABLE_FACTOR = 2.2


def check_export_memory(run_file: Path, quantize_bits: Optional[int] = None) -> None:
    """Refuse in one line an export whose model cannot fit this process: the export, as TF Serving,
    holds every table whole in one process, whatever the run trained with (``--parallel ps``
    shards). Checked against the process's caps (RLIMIT_DATA with its threads' stacks, its cgroup)
    and the machine's available memory; a run.json that cannot be read is load_run's to report."""
    import json

    from tfdlrm.presets import ModelConfig
    from tfdlrm.tables import table_specs
    from tfdlrm.training.memory import RUNTIME_BYTES, format_bytes, process_rss, refuse_over_caps, refuse_over_machine

    try:
        meta = json.loads(run_file.read_text())
        config = ModelConfig.from_dict(meta["config"], meta["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    tables = sum(part.bytes for spec in table_specs(config) for part in spec.parts if part.rowwise)
    need = int(max(process_rss() or 0, RUNTIME_BYTES) + EXPORT_TABLE_FACTOR * tables
               + (tables // 4 if quantize_bits else 0))
    what = (f"exporting {meta['model']} needs an estimated {format_bytes(need)} (its tables "
            f"{format_bytes(tables)}, whole in one process, as TF Serving will load them)")
    fix = ("export where one process can hold the model (and serve it there), or train smaller tables "
           "(--qr-collisions, --md-temperature, --hash-buckets)")
    refuse_over_caps(need, what, fix)
    refuse_over_machine(need, what, fix)


def _export(run_dir: str, base: Path, version: Optional[int], force: bool, dataset: Optional[str],
            log: Optional[Callable[[str], None]], held: ExitStack, which: str = "latest",
            quantize_bits: Optional[int] = None) -> Export:
    from tfdlrm.training.choose import choose_checkpoint
    from tfdlrm.training.rundir import CHECKPOINT_DIR, METRICS_FILE, RUN_FILE, load_run

    run = Path(run_dir)
    check_export_memory(run / RUN_FILE, quantize_bits)
    chosen_checkpoint = choose_checkpoint(run / CHECKPOINT_DIR, which, run=str(run_dir))
    # float32 compute whatever the run trained with: the weights are float32, and a serving
    # host's CPU may lack native bfloat16 (a bf16 run's predictions differ by ~1e-3).
    model, meta = load_run(run_dir, mixed_precision=None,
                           checkpoint=chosen_checkpoint.name if chosen_checkpoint.record else which)
    checkpoint = chosen_checkpoint.prefix
    features, info = serving_features(meta, model.config, dataset)
    if quantize_bits:
        from tfdlrm.layers.quantized import variable_name

        tables = model.sparse_arch.tables
        float_bytes = [int(np.prod(t.shape)) * t.dtype.size for t in tables]
        quantized = model.sparse_arch.quantize(quantize_bits)
        info["quantized_embeddings"] = {
            "bits": quantize_bits, "float_table_bytes": sum(float_bytes),
            "quantized_table_bytes": sum(q.bytes if q is not None else b for q, b in zip(quantized, float_bytes)),
            "tables_kept_float32": [variable_name(t) for q, t in zip(quantized, tables) if q is None]}
    _prepare_base(base)  # only now: an export that cannot start leaves no directory behind
    held.enter_context(hold(base, what=f"export base {base}", hint="wait for that export to finish, or use another "
                                                                    "--out"))
    for line in recover_base(base):
        if log is not None:
            log(line)
    chosen = choose_version(base, version, force)  # again, under the lock: another export may have added one
    info.update(run_dir=str(run.resolve()), checkpoint=str(Path(checkpoint).resolve()),
                exported_checkpoint=chosen_checkpoint.describe(), version=chosen)
    extra_files = {RUN_FILE: (run / RUN_FILE).read_bytes()}
    if (run / METRICS_FILE).is_file():
        extra_files[METRICS_FILE] = (run / METRICS_FILE).read_bytes()
        metrics = checkpoint_metrics(json.loads(extra_files[METRICS_FILE]), chosen_checkpoint)
        if metrics:
            info["metrics"] = metrics
    if info.get("dataset"):
        from tfdlrm.pipelines.manifest import MANIFEST

        extra_files["dataset_manifest.json"] = (Path(info["dataset"]) / MANIFEST).read_bytes()
    tmp = make_partial_dir(base, chosen)
    try:
        description = write_saved_model(tmp, model, meta["model"], features, info, extra_files)
        _publish(tmp, base / str(chosen), force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = Export(path=base / str(chosen), version=chosen, model=meta["model"], raw_features=features is not None,
                    description=description, run_dir=str(run_dir), checkpoint=checkpoint,
                    checkpoint_label=chosen_checkpoint.label())
    result.description["saved_model_bytes"] = _tree_bytes(result.path)
    if log is not None:
        log(result.summary())
    return result


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoint_metrics(metrics: dict, chosen) -> dict:
    """The held-out metrics of the exported weights for export.json: the run's final evaluation
    for its newest checkpoint, the test metrics of that epoch for an earlier epoch's (none for an
    earlier step checkpoint: nothing evaluated those weights)."""
    record = chosen.record
    if record is None or chosen.asked == "latest":
        return dict(metrics.get("evaluation", {}))
    if record["kind"] == "epoch":
        for entry in metrics.get("epochs", []):
            if entry.get("epoch") == record["epoch"] and entry.get("step") == record["step"]:
                return dict(entry["test"])
    return {}


def find_saved_model(path: str | os.PathLike) -> Path:
    """A SavedModel directory: ``path`` itself, or its latest integer version."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    found = versions(path)
    if found and (path / str(found[-1]) / "saved_model.pb").is_file():
        return path / str(found[-1])
    if not path.exists():
        raise UserError(f"{path} not found (give a SavedModel directory, or a base directory of versions)")
    raise UserError(f"{path} holds no SavedModel (no saved_model.pb, and no version directory with one)")
