"""The serving signatures of an export: raw features, tf.Example, ids, transform.

Each takes its inputs by name, checks their shapes, maps raw values with the dataset's own
mapping (pipelines/lookup.py) and returns probability and logit.  See docs/serving.md.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Optional

import tensorflow as tf

from tfdlrm.errors import UserError

SIGNATURE_RAW = "serving_default"
SIGNATURE_EXAMPLES = "examples"
SIGNATURE_IDS = "ids"
SIGNATURE_TRANSFORM = "transform"
ON_INVALID = "missing"


class ServingModule(tf.Module):
    """What the SavedModel holds: the model's variables and the raw-feature transform
    (its lookup tables, whose vocabulary files become assets).  No Keras object is
    tracked, so loading needs TensorFlow only; the signatures are ``tf.function``
    graphs traced from the Keras model over these variables."""

    def __init__(self, model: tf.keras.Model, features=None):
        super().__init__(name="tfdlrm_serving")
        # With quantized tables (export --quantize-embeddings), their codes, scales and biases instead of
        # the float tables, which the signatures then never read.
        arch = getattr(model, "sparse_arch", None)
        quantized = getattr(arch, "quantized", None) or []
        floats = {t.ref() for t, q in zip(arch.tables, quantized) if q is not None}
        kept = [v for v in model.variables if v.ref() not in floats]
        seen = {v.ref() for v in kept}
        kept += [v for q in quantized if q is not None for v in (q.codes, q.scale, q.bias) if v.ref() not in seen]
        self.model_variables = kept
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


def _finite(dense):
    """``dense`` (the ``ids`` signature's transformed features) guarded by a check that every
    value is finite.  A transformed feature is never NaN or infinite (the raw signatures map
    NaN and infinities to missing before the transform), and the model would turn one into a
    finite, plausible probability."""
    bad = tf.logical_not(tf.math.is_finite(dense))
    where = tf.concat([tf.where(bad), tf.constant([[-1, -1]], tf.int64)], axis=0)[0]  # the first bad [row, column]
    check = _require(tf.logical_not(tf.reduce_any(bad)),
                     "input dense must be finite: it holds transformed features, which have no missing value "
                     "(the raw signatures map NaN and infinite counts to missing); got",
                     tf.boolean_mask(dense, bad)[:1], "at [row, column]", where)
    with tf.control_dependencies([check]):
        return tf.identity(dense)


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
    ``tfdlrm.pipelines.features.RawFeatures``, or None for runs without a raw mapping)."""
    from tfdlrm.pipelines.features import NUM_CATEGORICAL, NUM_DENSE
    from tfdlrm.pipelines.lookup import parse_raw_examples

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
        return predict(_finite(checked["dense"]), checked["sparse"])

    from tfdlrm.pipelines.spec import TabularFeatures

    if isinstance(features, TabularFeatures):
        return _tabular_functions(model, features, predict)
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


def _vectors_checked(inputs: dict) -> dict:
    """``inputs`` (one [batch] vector each) guarded by checks of their rank and equal batch sizes."""
    checks = []
    names = list(inputs)
    for name in names:
        shape = tf.shape(inputs[name])
        checks.append(_require(tf.equal(tf.size(shape), 1),
                               f"input {name} must be a vector of shape [batch]; got shape", shape))
    with tf.control_dependencies(checks):
        size = {name: tf.shape(inputs[name])[0] for name in names}
        for name in names[1:]:
            checks.append(_require(tf.equal(size[name], size[names[0]]),
                                   f"inputs {names[0]} and {name} must have the same batch size; got",
                                   size[names[0]], "and", size[name]))
    with tf.control_dependencies(checks):
        return {name: tf.identity(value) for name, value in inputs.items()}


def _tabular_functions(model, features, predict) -> dict:
    """The signatures of a model trained on your own features (``pipelines/spec.py``):
    ``serving_default`` takes one named [batch] input per column (float32 dense, string
    categorical, the raw separated string for multi-hot), ``examples`` tf.Example protos
    with the same names, ``transform`` the named inputs -> model inputs, ``ids`` the model
    inputs (multi-hot: int64 [batch, tables, width] padded with -1)."""
    config = model.config
    spec = features.spec
    names = features.input_names
    dense_names = {c.name for c in spec.dense}
    specs = [tf.TensorSpec([None], tf.float32 if n in dense_names else tf.string, name=n) for n in names]
    multi_hot = spec.multi_hot

    def model_inputs(*args):
        return features(_vectors_checked(dict(zip(names, args))))

    def padded(inputs):
        sparse = inputs["sparse"]
        return {"dense": inputs["dense"], "sparse": sparse.to_tensor(default_value=-1) if multi_hot else sparse}

    def raw(*args):
        inputs = model_inputs(*args)
        return predict(inputs["dense"], inputs["sparse"])

    def examples(examples):
        columns = features.parse_examples(examples)
        inputs = features(columns)
        return predict(inputs["dense"], inputs["sparse"])

    def transform(*args):
        return padded(model_inputs(*args))

    sparse_shape = [None, config.num_tables] + ([None] if multi_hot else [])

    def ids(dense, sparse):
        checked = _checked({"dense": dense}, {"dense": (config.num_dense, "float32 (transformed dense features)")})
        if multi_hot:
            sparse = tf.RaggedTensor.from_tensor(sparse, padding=tf.constant(-1, tf.int64), ragged_rank=2)
        return predict(_finite(checked["dense"]), sparse)

    with _ids_unchecked(model):
        return {
            SIGNATURE_RAW: tf.function(raw, input_signature=specs).get_concrete_function(),
            SIGNATURE_EXAMPLES: tf.function(examples, input_signature=[
                tf.TensorSpec([None], tf.string, name="examples")]).get_concrete_function(),
            SIGNATURE_TRANSFORM: tf.function(transform, input_signature=specs).get_concrete_function(),
            SIGNATURE_IDS: tf.function(ids, input_signature=[
                tf.TensorSpec([None, config.num_dense], tf.float32, name="dense"),
                tf.TensorSpec(sparse_shape, tf.int64, name="sparse")]).get_concrete_function(),
        }


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


def serving_features(meta: dict, config, dataset: Optional[str] = None):
    """``(RawFeatures or None, info)`` for a run's ``run.json`` (``meta``).

    Criteo runs get the mapping of the dataset they trained on, found at the path in
    ``run.json`` (or ``dataset``), whose manifest must be the one the run recorded, and
    whose vocabulary files must have the sha256 the manifest recorded (an edited one would
    shift ids).  ``info["vocabulary_files"]`` lists each file's path, ``asset`` (its name
    under the SavedModel's ``assets/``), bytes and sha256; ``vocabulary_verified`` says
    whether the manifest had them to check against (datasets converted before did not).
    Generated data has no raw mapping: ``(None, info)``.
    """
    from tfdlrm.pipelines.lookup import RawFeatures
    from tfdlrm.pipelines.manifest import MANIFEST, check_vocabulary, read_manifest
    from tfdlrm.pipelines.vocabulary import CategoricalMapping

    data = meta.get("data") or {}
    if data.get("kind") != "criteo":
        return None, {"raw_features": False, "data_kind": data.get("kind")}
    path = Path(dataset) if dataset else Path(data.get("path", ""))
    manifest_file = path / MANIFEST
    hint = "give its new location with --dataset DIR" if not dataset else "check --dataset"
    if not manifest_file.is_file():
        raise UserError(f"the run's dataset {path} has no {MANIFEST} (moved or deleted?): the export needs its "
                        f"categorical mapping and vocabularies; {hint}")
    manifest, raw = read_manifest(path, check_files=False)
    if data.get("manifest_sha256") and hashlib.sha256(raw).hexdigest() != data["manifest_sha256"]:
        raise UserError(f"{manifest_file} is not the manifest the run trained with (its sha256 differs from "
                        f"run.json's): the dataset was converted again or replaced; {hint}")
    files, verified = check_vocabulary(path, manifest)
    vocabulary = {"vocabulary_files": [{**f, "asset": Path(f["path"]).name if f["bytes"] else None}  # empty: no table
                                       for f in files], "vocabulary_verified": verified}
    if manifest.get("features") is not None:
        from tfdlrm.pipelines.spec import TabularFeatures

        if tuple(c["table_size"] for c in manifest["features"]["columns"]) != tuple(config.table_rows):
            raise UserError(f"{path}: the feature spec gives tables of {manifest['table_sizes']} rows but the model "
                            f"has {list(config.table_rows)}: not the dataset the run trained on")
        features = TabularFeatures(manifest["features"], str(path))
        return features, {"raw_features": True, "data_kind": "features", "dataset": str(path.resolve()),
                          "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                          "feature_spec": manifest["features"]["spec"], **vocabulary}
    try:
        mapping = CategoricalMapping.load(path, manifest["mapping"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest_file} is unreadable: {e}") from None
    if tuple(mapping.table_sizes()) != tuple(config.table_rows):
        raise UserError(f"{path}: the mapping gives tables of {list(mapping.table_sizes())} rows but the model has "
                        f"{list(config.table_rows)}: not the dataset the run trained on")
    features = RawFeatures(mapping, str(path), on_invalid=ON_INVALID)
    info = {"raw_features": True, "data_kind": "criteo", "dataset": str(path.resolve()),
            "manifest_sha256": hashlib.sha256(raw).hexdigest(), "mapping": manifest["mapping"], **vocabulary}
    return features, info


def _shape(dims) -> str:
    """``[batch, 13]``; a later unknown dimension (a bag of ids) is ``width``."""
    return "[" + ", ".join(("batch" if i == 0 else "width") if d is None else str(d) for i, d in enumerate(dims)) + "]"
