"""SavedModel export for TF Serving: raw Criteo features in, click probability out.

``python -m tfdlrm export RUN_DIR`` (and ``train --export``) reads a run directory's
``run.json`` and latest checkpoint (:func:`tfdlrm.training.load_run`: the plain
one-device model, whatever ``--devices``/``--parallel`` trained it) and writes
``BASE/<version>/`` (``BASE`` = ``saved_models/<model>`` or ``--out``), TF Serving's
layout::

    saved_model.pb, variables/             the weights and the signature graphs
    assets/C1.txt .. C26.txt               vocabulary mode: the vocabularies (hashing needs none)
    assets.extra/tf_serving_warmup_requests  PredictionLog records TF Serving replays when it loads
    assets.extra/export.json               what this version is: model, run, checkpoint, signatures,
                                           mapping, the choices below
    assets.extra/run.json, metrics.json, dataset_manifest.json   copies from the run and its dataset

Versions are integer directories: ``--version N`` or the next free number.  An
existing version is replaced only with ``force``.  The export is written into
``BASE/.<version>.partial-*`` (a name TF Serving ignores) and renamed into place, so a
half-written version is never visible.

Signatures (method ``tensorflow/serving/predict``; every one but ``transform``
returns ``probability`` and ``logit``, float32 ``[batch, 1]``):

=================  ==================================================================
``serving_default``  ``dense`` float32 [batch, 13] raw counts (NaN, +-inf or negative =
                     missing) and ``categorical`` string [batch, 26] raw 8-hex values
                     (either case; "" = missing)
``examples``         ``examples`` string [batch]: serialized ``tf.Example`` protos in the
                     raw-feature schema of ``pipelines/features.py``
``ids``              already-mapped model inputs: ``dense`` float32 [batch, 13]
                     (log-transformed) and ``sparse`` int64 [batch, 26] ids
``transform``        the raw inputs of ``serving_default`` -> ``dense``, ``sparse``: what
                     the model gets (for clients that check their own preprocessing)
=================  ==================================================================

The mapping in the graph is ``pipelines.features.RawFeatures``, the definition the
converter's numpy twins are tested against bit for bit: log transform, then hashing
or vocabulary lookup (``StaticHashTable`` over the dataset's vocabulary files, which
become SavedModel assets).  Two serving-only choices:

* a categorical value that is neither empty nor 8 hex digits (bad characters, wrong
  length) maps to the *missing* id, deterministically (``on_invalid="missing"``);
  upper case is valid and maps as lower case, as in conversion;
* +inf and -inf dense counts are missing, as NaN (``dense_transform``).

Runs trained on generated data (``random``, ``synthetic``) have no raw-feature
mapping: their export has only ``ids``, and ``serving_default`` is ``ids`` too; the
command says so.

The SavedModel holds a ``tf.Module`` with the model's variables, the lookup tables
and ``tf.function`` signatures traced from the Keras model: loading it needs
TensorFlow only (not tfdlrm, tf_keras or tensorflow_recommenders).  The embedding
layer's id range check stays in ``ids`` (client ids can be anything: an
out-of-range id fails with the feature named); the raw signatures leave it out,
since their ids come from the mapping and are in range by construction (the export
checks that the mapping's table sizes equal the model's).

Request checks run in the graph, so what TF Serving feeds (it does not check shapes)
fails with ``InvalidArgument`` (HTTP 400) and a ``tfdlrm:`` message: an input of
the wrong width, inputs of different batch sizes.  A wrong dtype or a missing input
is refused by TensorFlow / TF Serving before the graph runs, also as InvalidArgument.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfdlrm.errors import UserError

EXPORT_ROOT = "saved_models"
EXTRA_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
EXPORT_INFO = "export.json"
EXPORT_FORMAT = "tfdlrm.serving"
EXPORT_FORMAT_VERSION = 1

SIGNATURE_RAW = "serving_default"
SIGNATURE_EXAMPLES = "examples"
SIGNATURE_IDS = "ids"
SIGNATURE_TRANSFORM = "transform"
ON_INVALID = "missing"
WARMUP_BATCH_SIZES = (1, 16)

_VERSION = re.compile(r"^\d+$")


# -- the serving module --------------------------------------------------------------
class ServingModule(tf.Module):
    """What the SavedModel holds: the model's variables and the raw-feature transform
    (its lookup tables, whose vocabulary files become assets).  No Keras object is
    tracked, so loading needs TensorFlow only; the signatures are ``tf.function``
    graphs traced from the Keras model over these variables."""

    def __init__(self, model: tf.keras.Model, features=None):
        super().__init__(name="tfdlrm_serving")
        self.model_variables = list(model.variables)
        self.features = features


def _require(condition, *message):
    """An in-graph check: fails the request with ``InvalidArgument`` and a ``tfdlrm:`` message."""
    return tf.debugging.Assert(condition, [f"tfdlrm: {message[0]}", *message[1:]], summarize=8)


def _checked(inputs: dict, widths: dict) -> dict:
    """``inputs`` guarded by checks of their widths and of equal batch sizes.

    TF Serving feeds tensors to the graph without checking them against the
    signature's shapes, so the checks must be in the graph.
    """
    def dim(name, i):  # -1 where the input has no dimension i (a scalar, a vector)
        return tf.concat([tf.shape(inputs[name]), [-1, -1]], axis=0)[i]

    checks = []
    names = list(inputs)
    for name, (width, what) in widths.items():
        shape = tf.shape(inputs[name])
        checks.append(_require(
            tf.logical_and(tf.equal(tf.size(shape), 2), tf.equal(dim(name, 1), width)),
            f"input {name} must be {what} of shape [batch, {width}]; got shape", shape))
    with tf.control_dependencies(checks):  # a wrong shape is reported as such, not as a batch mismatch
        first = names[0]
        for name in names[1:]:
            checks.append(_require(
                tf.equal(dim(name, 0), dim(first, 0)),
                f"inputs {first} and {name} must have the same batch size; got", dim(first, 0), "and",
                dim(name, 0)))
    with tf.control_dependencies(checks):
        return {name: tf.identity(value) for name, value in inputs.items()}


@contextlib.contextmanager
def _ids_unchecked(model):
    """Trace without the embedding layer's id range check (ids in range by construction)."""
    arch = model.sparse_arch
    saved = arch.check_ids
    arch.check_ids = False
    try:
        yield
    finally:
        arch.check_ids = saved


def signature_functions(model: tf.keras.Model, features=None) -> dict:
    """The concrete signature functions of ``model`` (and ``features``, a
    ``pipelines.features.RawFeatures``, or None for runs without a raw mapping)."""
    from pipelines.features import NUM_CATEGORICAL, NUM_DENSE, parse_raw_examples

    config = model.config

    def predict(dense, sparse):
        logit = model.logits({"dense": dense, "sparse": sparse}, training=False)  # [batch, 1]
        return {"probability": tf.math.sigmoid(logit), "logit": logit}

    sparse_shape = [None, config.num_tables] + ([config.ids_per_lookup] if config.ids_per_lookup > 1 else [])

    @tf.function(input_signature=[tf.TensorSpec([None, config.num_dense], tf.float32, name="dense"),
                                  tf.TensorSpec(sparse_shape, tf.int64, name="sparse")])
    def ids(dense, sparse):
        widths = {"dense": (config.num_dense, "float32 (transformed dense features)")}
        if config.ids_per_lookup == 1:
            widths["sparse"] = (config.num_tables, "int64 (categorical ids)")
        checked = _checked({"dense": dense, "sparse": sparse}, widths)
        return predict(checked["dense"], checked["sparse"])

    functions = {SIGNATURE_IDS: ids.get_concrete_function()}
    if features is None:
        return {SIGNATURE_RAW: functions[SIGNATURE_IDS], **functions}

    raw_widths = {"dense": (NUM_DENSE, "float32 (raw counts)"),
                  "categorical": (NUM_CATEGORICAL, "string (raw 8-hex values)")}
    raw_spec = [tf.TensorSpec([None, NUM_DENSE], tf.float32, name="dense"),
                tf.TensorSpec([None, NUM_CATEGORICAL], tf.string, name="categorical")]

    def mapped(dense, categorical):
        checked = _checked({"dense": dense, "categorical": categorical}, raw_widths)
        return features(checked["dense"], checked["categorical"])

    @tf.function(input_signature=raw_spec)
    def raw(dense, categorical):
        inputs = mapped(dense, categorical)
        return predict(inputs["dense"], inputs["sparse"])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def examples(examples):
        dense, categorical = parse_raw_examples(examples)
        inputs = features(dense, categorical)
        return predict(inputs["dense"], inputs["sparse"])

    @tf.function(input_signature=raw_spec)
    def transform(dense, categorical):
        return mapped(dense, categorical)

    with _ids_unchecked(model):
        return {SIGNATURE_RAW: raw.get_concrete_function(),
                SIGNATURE_EXAMPLES: examples.get_concrete_function(),
                SIGNATURE_IDS: functions[SIGNATURE_IDS],
                SIGNATURE_TRANSFORM: transform.get_concrete_function()}


def describe_signatures(functions: dict) -> dict:
    """``{name: {"inputs": {key: {"dtype", "shape"}}, "outputs": {...}}}`` (shape: None = any)."""
    def spec(s):
        return {"dtype": s.dtype.name, "shape": [None if d is None else int(d) for d in s.shape.as_list()]}

    out = {}
    for name, fn in functions.items():
        args, kwargs = fn.structured_input_signature
        inputs = {**{s.name: s for s in args}, **kwargs}
        out[name] = {"inputs": {k: spec(v) for k, v in inputs.items()},
                     "outputs": {k: spec(v) for k, v in fn.structured_outputs.items()}}
    return out


# -- raw features of a run -------------------------------------------------------------
def serving_features(meta: dict, config, dataset: Optional[str] = None):
    """``(RawFeatures or None, info)`` for a run's ``run.json`` (``meta``).

    Criteo runs get the mapping of the dataset they trained on, found at the path in
    ``run.json`` (or ``dataset``), whose manifest must be the one the run recorded.
    Generated data has no raw mapping: ``(None, info)``.
    """
    from pipelines.criteo import MANIFEST
    from pipelines.features import CategoricalMapping, RawFeatures

    data = meta.get("data") or {}
    if data.get("kind") != "criteo":
        return None, {"raw_features": False, "data_kind": data.get("kind")}
    path = Path(dataset) if dataset else Path(data.get("path", ""))
    manifest_file = path / MANIFEST
    hint = "give its new location with --dataset DIR" if not dataset else "check --dataset"
    if not manifest_file.is_file():
        raise UserError(f"the run's dataset {path} has no {MANIFEST} (moved or deleted?): the export needs its "
                        f"categorical mapping and vocabularies; {hint}")
    raw = manifest_file.read_bytes()
    import hashlib

    if data.get("manifest_sha256") and hashlib.sha256(raw).hexdigest() != data["manifest_sha256"]:
        raise UserError(f"{manifest_file} is not the manifest the run trained with (its sha256 differs from "
                        f"run.json's): the dataset was converted again or replaced; {hint}")
    try:
        manifest = json.loads(raw)
        mapping = CategoricalMapping.load(path, manifest["mapping"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest_file} is unreadable: {e}") from None
    if tuple(mapping.table_sizes()) != tuple(config.table_rows):
        raise UserError(f"{path}: the mapping gives tables of {list(mapping.table_sizes())} rows but the model has "
                        f"{list(config.table_rows)}: not the dataset the run trained on")
    features = RawFeatures(mapping, str(path), on_invalid=ON_INVALID)
    info = {"raw_features": True, "data_kind": "criteo", "dataset": str(path.resolve()),
            "manifest_sha256": hashlib.sha256(raw).hexdigest(), "mapping": manifest["mapping"]}
    return features, info


# -- warm-up requests -------------------------------------------------------------------
def sample_raw_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` made-up raw rows: float32 [n, 13] counts (some NaN), object [n, 26] hex (some "")."""
    from pipelines.features import NUM_CATEGORICAL, NUM_DENSE

    rng = np.random.default_rng(seed)
    dense = np.floor(rng.exponential(20.0, (n, NUM_DENSE))).astype(np.float32)
    dense[rng.random((n, NUM_DENSE)) < 0.2] = np.nan
    values = rng.integers(0, 1 << 32, (n, NUM_CATEGORICAL), dtype=np.uint64)
    categorical = np.array([[f"{v:08x}" for v in row] for row in values], dtype=object)
    categorical[rng.random((n, NUM_CATEGORICAL)) < 0.15] = ""
    return dense, categorical


def sample_ids(config, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` made-up model inputs: float32 [n, num_dense] in [0, 1), int64 ids in range."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n, config.num_dense), dtype=np.float32)
    shape = (n, config.ids_per_lookup) if config.ids_per_lookup > 1 else (n,)
    sparse = np.stack([rng.integers(0, rows, shape) for rows in config.table_rows], axis=1).astype(np.int64)
    return dense, sparse


def warmup_requests(model_name: str, functions: dict, config) -> list:
    """PredictionLog protos for ``assets.extra/tf_serving_warmup_requests``: each signature
    at batch 1 and 16, with made-up rows (TF Serving runs each once when it loads)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from pipelines.features import raw_example

    logs = []
    for batch in WARMUP_BATCH_SIZES:
        dense, categorical = sample_raw_rows(batch, seed=batch)
        ids_dense, ids_sparse = sample_ids(config, batch, seed=batch)
        inputs = {}
        if SIGNATURE_TRANSFORM in functions:  # raw signatures exist
            raw = {"dense": tf.make_tensor_proto(dense, tf.float32),
                   "categorical": tf.make_tensor_proto(categorical.astype(bytes), tf.string)}
            serialized = [raw_example(d, c).SerializeToString() for d, c in zip(dense, categorical)]
            inputs = {SIGNATURE_RAW: raw, SIGNATURE_TRANSFORM: raw,
                      SIGNATURE_EXAMPLES: {"examples": tf.make_tensor_proto(serialized, tf.string)}}
        inputs[SIGNATURE_IDS] = {"dense": tf.make_tensor_proto(ids_dense, tf.float32),
                                 "sparse": tf.make_tensor_proto(ids_sparse, tf.int64)}
        for signature, tensors in inputs.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
            for key, proto in tensors.items():
                request.inputs[key].CopyFrom(proto)
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


# -- writing ---------------------------------------------------------------------------------
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
        for log in warmup_requests(model_name, functions, model.config):
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
        "choices": {
            "categorical_invalid": "neither empty nor 8 hex digits -> the missing id" if features else None,
            "categorical_case": "upper and lower case hex map alike" if features else None,
            "dense_missing": "NaN, +inf, -inf and negative counts -> 0 (as a missing value)" if features else None,
        },
        "warmup_requests": len(WARMUP_BATCH_SIZES) * (len(functions) - (features is None)),
    }
    for name, data in (extra_files or {}).items():
        (extra / name).write_bytes(data)
    (extra / EXPORT_INFO).write_text(json.dumps(description, indent=2) + "\n")
    return description


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

    def summary(self) -> str:
        lines = [f"exported {self.model} from {self.run_dir} ({Path(self.checkpoint).name}) to {self.path}"]
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


def _shape(dims) -> str:
    return "[" + ", ".join("batch" if d is None else str(d) for d in dims) + "]"


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
    """Move the finished export into place: one rename (a replaced version is moved
    aside first, then deleted)."""
    old = None
    if final.exists():
        if not force:
            raise UserError(f"{final} appeared while exporting; --force replaces it")
        old = final.with_name(f".{final.name}.replaced-{os.getpid()}-{time.time_ns()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if old is not None:
            os.rename(old, final)
        raise UserError(f"cannot move the export into {final}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_partial_dir(base: Path, version: int) -> Path:
    """A new ``base/.<version>.partial-*`` directory (TF Serving ignores names that are
    not numbers), readable as a directory made with the process's umask would be (a
    server running as another user must read the version it is renamed into)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=base))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _read_run(run: Path) -> dict:
    from tfdlrm.training import RUN_FILE

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
               dataset: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> Export:
    """Export the run in ``run_dir`` to ``out/<version>`` (default ``saved_models/<model>/<next>``)."""
    from tfdlrm.training import CHECKPOINT_DIR, METRICS_FILE, RUN_FILE, load_run

    run = Path(run_dir)
    meta = _read_run(run)
    base, chosen = check_destination(run_dir, out, version, force, meta["model"], create=False)
    # float32 compute whatever the run trained with: the weights are float32, and a serving
    # host's CPU may lack native bfloat16 (a bf16 run's predictions differ by ~1e-3).
    model, meta = load_run(run_dir, mixed_precision=None)
    checkpoint = tf.train.latest_checkpoint(str(run / CHECKPOINT_DIR)) or ""
    features, info = serving_features(meta, model.config, dataset)
    _prepare_base(base)  # only now: an export that cannot start leaves no directory behind
    info.update(run_dir=str(run.resolve()), checkpoint=str(Path(checkpoint).resolve()), version=chosen)
    extra_files = {RUN_FILE: (run / RUN_FILE).read_bytes()}
    if (run / METRICS_FILE).is_file():
        extra_files[METRICS_FILE] = (run / METRICS_FILE).read_bytes()
        info["metrics"] = {k: v for k, v in json.loads(extra_files[METRICS_FILE]).get("evaluation", {}).items()}
    if info.get("dataset"):
        from pipelines.criteo import MANIFEST

        extra_files["dataset_manifest.json"] = (Path(info["dataset"]) / MANIFEST).read_bytes()
    tmp = make_partial_dir(base, chosen)
    try:
        description = write_saved_model(tmp, model, meta["model"], features, info, extra_files)
        _publish(tmp, base / str(chosen), force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = Export(path=base / str(chosen), version=chosen, model=meta["model"], raw_features=features is not None,
                    description=description, run_dir=str(run_dir), checkpoint=checkpoint)
    if log is not None:
        log(result.summary())
    return result


# -- bench serving --------------------------------------------------------------------------
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


def _bench_inputs(fn, path: Path, batch: int, count: int) -> list[dict]:
    """``count`` distinct requests of ``batch`` made-up rows for signature ``fn``."""
    from pipelines.features import raw_example

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
            from pipelines.features import CategoricalMapping, RawFeatures
            from tfdlrm.presets import get_preset
            from tfdlrm.training import build_model

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
