"""SavedModel export for TF Serving (tfdlrm/serving/): every signature of DLRM, DCN, DCN-v2,
a hybrid 4-device run and a generated-data run, loaded by a TensorFlow-only process and
compared with the in-memory model on the real held-out rows; what saved_model_cli shows;
docs/serving.md's requests; bad requests as TF Serving feeds them; the command's errors."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, SHARED_CRITEO, assert_clean_error, run_cli
from tfdlrm.serving.export import EXTRA_DIR, export_run, find_saved_model, versions
from tfdlrm.serving.warmup import WARMUP_FILE

TOLERANCE = 1e-6
# The signature table in docs/serving.md: name -> (inputs, outputs), each key -> (dtype, shape).
RAW_INPUTS = {"dense": ("DT_FLOAT", (-1, 13)), "categorical": ("DT_STRING", (-1, 26))}
PREDICTION = {"probability": ("DT_FLOAT", (-1, 1)), "logit": ("DT_FLOAT", (-1, 1))}
MODEL_INPUTS = {"dense": ("DT_FLOAT", (-1, 13)), "sparse": ("DT_INT64", (-1, 26))}
DOCUMENTED = {
    "serving_default": (RAW_INPUTS, PREDICTION),
    "examples": ({"examples": ("DT_STRING", (-1,))}, PREDICTION),
    "ids": (MODEL_INPUTS, PREDICTION),
    "transform": (RAW_INPUTS, MODEL_INPUTS),
}


def serving_doc() -> str:
    """docs/serving.md: the signature table and the REST and gRPC request examples."""
    return (REPO / "docs" / "serving.md").read_text()


def _split_dir() -> Path:
    split = SHARED_CRITEO / "kaggle_split"
    if not (split / "train.txt").is_file():
        pytest.skip("../shared/data/criteo is not present")
    return split


def _in_memory(run_dir, source) -> dict:
    """The run's model (load_run) on the converted held-out split, in file order."""
    from tfdlrm.training.rundir import load_run

    model, _ = load_run(str(run_dir), mixed_precision=None)  # exports compute in float32
    out = {"probability": [], "logit": [], "dense": [], "sparse": []}
    for features, _ in source.eval_dataset(1024):
        out["probability"].append(model.predict_on_batch(features))
        out["logit"].append(model.logits(features).numpy())
        out["dense"].append(features["dense"].numpy())
        out["sparse"].append(features["sparse"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """kaggle_split converted twice: vocabulary (T = 2) and hashing (1,000 buckets)."""
    from tfdlrm.pipelines.convert import ConvertSpec, convert

    split = _split_dir()
    root = tmp_path_factory.mktemp("datasets")
    out = {}
    for name, kwargs in (("vocabulary", {"min_frequency": 2}), ("hash", {"hash_buckets": 1000})):
        convert(ConvertSpec(out=str(root / name), train=[str(split / "train.txt")], test=[str(split / "test.txt")],
                            **kwargs))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exports(datasets, tmp_path_factory):
    """DLRM and DCN-v2 on the vocabulary dataset, DCN on the hashed one, DLRM on synthetic
    data: trained a few steps, exported; with the in-memory model's outputs."""
    from tfdlrm.pipelines.sources import CriteoSource, open_data
    from tfdlrm.presets import get_preset
    from tfdlrm.training.loop import train
    from tfdlrm.training.spec import TrainSpec

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, model, data in (("dlrm", "dlrm", "vocabulary"), ("dcn", "dcn", "hash"),
                              ("dcn-v2", "dcn-v2", "vocabulary"), ("synthetic", "dlrm", "synthetic")):
        run = root / f"run-{name}"
        extra = {"train_examples": 2048, "eval_examples": 1024} if data == "synthetic" else {}
        # xla="off": the export is of the model, whichever step trained it (that step: tests/models)
        train(TrainSpec(model=model, preset="tiny", data=str(datasets.get(data, data)), steps_per_epoch=4, xla="off",
                        batch_size=256, optimizer="adagrad", lr=0.05, out=str(run), verbose=0, **extra),
              log=lambda s: None)
        result = export_run(str(run), out=str(root / "saved" / name))
        if data == "synthetic":
            source = open_data("synthetic", get_preset("tiny"), train_examples=2048, eval_examples=1024)
        else:
            source = CriteoSource(datasets[data], get_preset("tiny"))
        out[name] = {"run": run, "export": result, "expected": _in_memory(run, source)}
    return out


@pytest.fixture(scope="module")
def hybrid_export(datasets, tmp_path_factory):
    """`train --devices 4 --parallel hybrid --export`: two tables split by rows over two devices each."""
    from tfdlrm.pipelines.sources import CriteoSource
    from tfdlrm.presets import get_preset

    root = tmp_path_factory.mktemp("hybrid")
    proc = run_cli("train", "--data", str(datasets["hash"]), "--devices", "4", "--parallel", "hybrid",
                   "--budget", "210000", "--steps-per-epoch", "4", "--batch-size", "256", "--optimizer", "adagrad",
                   "--lr", "0.05", "--out", str(root / "run"), "--export", str(root / "saved"))
    assert proc.returncode == 0, proc.stderr
    assert "table C25 split by rows over 2 devices" in proc.stdout
    assert f"to {root / 'saved' / '1'}" in proc.stdout
    source = CriteoSource(datasets["hash"], get_preset("tiny"))
    return {"run": root / "run", "path": root / "saved" / "1", "expected": _in_memory(root / "run", source)}


def _serve_in_fresh_process(tmp_path, exports: dict) -> tuple[dict, dict]:
    """Run tests/serving/serving_client.py on ``{name: (path, ids_npz or None)}``."""
    request = {"raw_file": str(_split_dir() / "test.txt"),
               "exports": [{"name": n, "path": str(p), "ids_npz": ids and str(ids)} for n, (p, ids) in exports.items()]}
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    client = Path(__file__).with_name("serving_client.py")
    proc = subprocess.run([sys.executable, str(client), str(tmp_path / "request.json"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    return result, dict(np.load(tmp_path / "out.npz"))


def _assert_matches(outputs: dict, name: str, expected: dict, signatures) -> None:
    for signature in signatures:
        for key in ("probability", "logit"):
            got = outputs[f"{name}/{signature}/{key}"]
            assert got.shape == expected[key].shape == (len(expected[key]), 1), (name, signature, key)
            diff = np.abs(got - expected[key]).max()
            assert diff <= TOLERANCE, f"{name} {signature} {key}: max abs difference {diff}"


def test_exports_serve_in_a_tensorflow_only_process_as_the_model_predicts(exports, datasets, tmp_path):
    ids_file = tmp_path / "ids.npz"
    synthetic_inputs = exports["synthetic"]["expected"]
    np.savez(ids_file, dense=synthetic_inputs["dense"], sparse=synthetic_inputs["sparse"])
    requests = {name: (e["export"].path, ids_file if name == "synthetic" else None) for name, e in exports.items()}
    hidden = {path: path.with_name(path.name + ".hidden") for path in datasets.values()}
    for path, away in hidden.items():  # the exports must not need the datasets (vocabularies are assets)
        path.rename(away)
    try:
        result, outputs = _serve_in_fresh_process(tmp_path, requests)
    finally:
        for path, away in hidden.items():
            away.rename(path)
    assert result["forbidden"] == []  # loading and calling needed TensorFlow only
    for name in ("dlrm", "dcn", "dcn-v2"):
        assert result["signatures"][name] == ["examples", "ids", "serving_default", "transform"]
        expected = exports[name]["expected"]
        assert len(expected["probability"]) == 2686  # every held-out row
        _assert_matches(outputs, name, expected, ("serving_default", "examples", "ids"))
        # the graph's mapping of the raw rows is the converter's, bit for bit
        np.testing.assert_array_equal(outputs[f"{name}/transform/sparse"], expected["sparse"])
        np.testing.assert_array_equal(outputs[f"{name}/transform/dense"].view(np.int32),
                                      expected["dense"].view(np.int32))
    assert result["signatures"]["synthetic"] == ["ids", "serving_default"]
    _assert_matches(outputs, "synthetic", exports["synthetic"]["expected"], ("serving_default", "ids"))


def test_the_demos_predict_raw_prints_its_predictions_and_no_tensorflow_log(exports):
    """make demo's last step: three probabilities on stdout, nothing on stderr (TensorFlow's start-up
    lines, a cuInit error among them on a machine without a GPU, only with TFDLRM_TF_LOGS=1)."""
    base = exports["dlrm"]["export"].path.parent
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL", "TFDLRM_TF_LOGS")}
    command = [sys.executable, "-m", "tools.predict_raw", str(base), str(_split_dir() / "test.txt")]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert [line.count("click probability") for line in quiet.stdout.splitlines()] == [1, 1, 1]
    assert quiet.stderr == ""
    shown = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**env, "TFDLRM_TF_LOGS": "1"})
    assert shown.returncode == 0 and shown.stdout == quiet.stdout
    assert "absl::InitializeLog" in shown.stderr or "oneDNN" in shown.stderr, shown.stderr


@pytest.mark.slow
def test_a_hybrid_four_device_run_with_split_tables_exports_a_one_device_graph(hybrid_export, tmp_path):
    result, outputs = _serve_in_fresh_process(tmp_path, {"hybrid": (hybrid_export["path"], None)})
    assert result["forbidden"] == []
    expected = hybrid_export["expected"]
    _assert_matches(outputs, "hybrid", expected, ("serving_default", "examples", "ids"))
    np.testing.assert_array_equal(outputs["hybrid/transform/sparse"], expected["sparse"])
    graph = (hybrid_export["path"] / "saved_model.pb").read_bytes()
    assert b"CPU:1" not in graph and b"CPU:3" not in graph  # no placement on the training devices


def _saved_model_cli(path) -> str:
    script = Path(sys.executable).parent / "saved_model_cli"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run(command + ["show", "--all", "--dir", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _parse_signature_defs(text: str) -> dict:
    """``saved_model_cli show --all`` -> {signature: (inputs, outputs, method)}."""
    out = {}
    for block in re.split(r"\nsignature_def\['", text)[1:]:
        name = block.split("'", 1)[0]
        inputs_text, _, outputs_text = block.partition("contains the following output(s):")
        def tensors(part):
            return {key: (dtype, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()))
                    for key, dtype, shape in re.findall(
                        r"\w+\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))", part)}
        method = re.search(r"Method name is: (\S*)", outputs_text)
        out[name] = (tensors(inputs_text), tensors(outputs_text), method.group(1) if method else "")
    return out


def test_saved_model_cli_shows_the_documented_signatures(exports):
    shown = _parse_signature_defs(_saved_model_cli(exports["dlrm"]["export"].path))
    shown.pop("__saved_model_init_op", None)
    assert set(shown) == set(DOCUMENTED)
    for name, (inputs, outputs) in DOCUMENTED.items():
        assert shown[name] == (inputs, outputs, "tensorflow/serving/predict"), name
    doc = serving_doc()
    for row in ("| `serving_default` | `dense` float32 `[batch, 13]`", "| `examples` | `examples` string `[batch]`",
                "| `ids` | `dense` float32 `[batch, 13]`", "| `transform` | `dense` float32 `[batch, 13]`"):
        assert row in doc, row
    generated = exports["synthetic"]["export"].description["signatures"]
    assert set(generated) == {"serving_default", "ids"}
    assert generated["serving_default"] == generated["ids"] == {
        "inputs": {"dense": {"dtype": "float32", "shape": [None, 13]}, "sparse": {"dtype": "int64", "shape": [None, 26]}},
        "outputs": {"probability": {"dtype": "float32", "shape": [None, 1]},
                    "logit": {"dtype": "float32", "shape": [None, 1]}}}


def test_export_directory_holds_assets_warmup_requests_and_the_run_config(exports):
    from tensorflow_serving.apis import prediction_log_pb2

    path = exports["dlrm"]["export"].path
    assert sorted(p.name for p in (path / "assets").iterdir()) == sorted(f"C{i}.txt" for i in range(1, 27))
    extra = path / EXTRA_DIR
    assert json.loads((extra / "run.json").read_text()) == json.loads((exports["dlrm"]["run"] / "run.json").read_text())
    info = json.loads((extra / "export.json").read_text())
    assert info["model"] == "dlrm" and info["version"] == 1 and info["raw_features"] is True
    assert info["mapping"]["categorical"] == "vocabulary" and info["checkpoint"].endswith("epoch-001")
    assert (extra / "dataset_manifest.json").is_file() and (extra / "metrics.json").is_file()
    # TF Serving replays each PredictionLog's request against the named signature when it loads
    loaded = tf.saved_model.load(str(path))
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(extra / WARMUP_FILE))]
    assert sorted({log.predict_log.request.model_spec.signature_name for log in logs}) == sorted(DOCUMENTED)
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.name == "dlrm"
        outputs = loaded.signatures[request.model_spec.signature_name](
            **{key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()})
        batch = next(iter(request.inputs.values())).tensor_shape.dim[0].size
        assert all(v.shape[0] == batch and np.isfinite(v.numpy()).all() for v in outputs.values())


def documented_request() -> dict:
    """The REST predict body in docs/serving.md (the JSON block after its marker comment)."""
    text = serving_doc()
    match = re.search(r"<!-- rest-request -->\s*```json\n(.*?)\n```", text, re.S)
    assert match, "docs/serving.md has no REST predict example"
    return json.loads(match.group(1))


def rest_row_format(body: dict, signature) -> dict:
    """TF Serving's REST row format ("instances") as the tensors it feeds: each named input
    stacked over the instances, in the signature's dtype."""
    _, specs = signature.structured_input_signature
    return {key: tf.constant(np.array([instance[key] for instance in body["instances"]],
                                      dtype=object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype))
            for key, spec in specs.items()}


def test_the_readme_rest_request_gives_the_models_probabilities(exports):
    body = documented_request()
    assert len(body["instances"]) == 2
    loaded = tf.saved_model.load(str(exports["dlrm"]["export"].path))
    signature = loaded.signatures["serving_default"]
    outputs = signature(**rest_row_format(body, signature))
    # the documented rows are the first two held-out rows (missing dense counts written as -1)
    expected = exports["dlrm"]["expected"]
    np.testing.assert_allclose(outputs["probability"].numpy(), expected["probability"][:2], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(outputs["logit"].numpy(), expected["logit"][:2], atol=TOLERANCE, rtol=0)


def test_the_readme_grpc_client_sends_a_request_the_signature_answers(exports, monkeypatch, capsys):
    """The gRPC snippet in docs/serving.md, run as written against a stub that answers with the signature."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    code = re.search(r"<!-- grpc-request -->\s*```python\n(.*?)\n```", serving_doc(), re.S)
    assert code, "docs/serving.md has no gRPC example"
    loaded = tf.saved_model.load(str(exports["dlrm"]["export"].path))

    class Stub:  # what TF Serving does with a PredictRequest
        def __init__(self, channel):
            pass

        def Predict(self, request, timeout=None):
            assert request.model_spec.name == "dlrm"
            fn = loaded.signatures[request.model_spec.signature_name]
            outputs = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
            response = predict_pb2.PredictResponse()
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub", Stub)
    namespace = {}
    exec(compile(code.group(1), "docs/serving.md", "exec"), namespace)
    got = tf.make_ndarray(namespace["response"].outputs["probability"])
    np.testing.assert_allclose(got, exports["dlrm"]["expected"]["probability"][:1], atol=TOLERANCE, rtol=0)
    assert capsys.readouterr().out.startswith("[[")


def test_odd_categorical_strings_and_infinite_counts_map_deterministically(exports):
    loaded = tf.saved_model.load(str(exports["dlrm"]["export"].path))
    transform, serve = loaded.signatures["transform"], loaded.signatures["serving_default"]
    line = (_split_dir() / "test.txt").read_text().splitlines()[0].split("\t")
    base = [x.encode() for x in line[14:]]
    odd = [b"ZZZZZZZZ", b"2d4ea12", b"2d4ea12b0", b"0x4ea12b", b" 2d4ea12", b"\xff\xfe\x00\x01\x02\x03\x04\x05",
           "ä1234567".encode(), b"2D4EA12B", b"x" * 1000]
    categorical = np.array([base] + [[value] + base[1:] for value in odd], dtype=object)
    dense = np.tile(np.array([[float(x) if x else np.nan for x in line[1:14]]], np.float32), (len(categorical), 1))
    first = transform(dense=tf.constant(dense), categorical=tf.constant(categorical))
    again = transform(dense=tf.constant(dense), categorical=tf.constant(categorical))
    np.testing.assert_array_equal(first["sparse"].numpy(), again["sparse"].numpy())
    ids = first["sparse"].numpy()[:, 0]
    assert ids[0] > 1  # a value seen in training
    assert ids[1:-2].tolist() == [0] * 7  # not 8 hex digits: the missing id
    assert ids[-2] == ids[0]  # upper case maps as lower case
    assert ids[-1] == 0
    assert (first["sparse"].numpy()[:, 1:] == first["sparse"].numpy()[:1, 1:]).all()
    # +inf and -inf are missing counts, as NaN is: same transform, same probability
    dense = np.tile(dense[:1], (4, 1))
    dense[1:, 0] = [np.inf, -np.inf, np.nan]
    cats = np.tile(categorical[:1], (4, 1))
    out = serve(dense=tf.constant(dense), categorical=tf.constant(cats))["probability"].numpy()
    mapped = transform(dense=tf.constant(dense), categorical=tf.constant(cats))["dense"].numpy()
    assert mapped[0, 0] == np.float32(math.log1p(float(line[1]))) and (mapped[1:, 0] == 0).all()
    assert np.isfinite(out).all() and out[1] == out[2] == out[3]


# -- bad requests, as TF Serving feeds them ------------------------------------------------------------
class ServerSession:
    """A SavedModel in a TF1 session fed the way TF Serving feeds it (Session::Run on the
    signature's tensors; no Python-side dtype or shape checks, which tf.function and
    Session.run would otherwise apply before TensorFlow sees the request)."""

    def __init__(self, path):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            self.meta = tf.compat.v1.saved_model.load(self.session, ["serve"], str(path))

    def run(self, signature: str, feeds: dict, output: str = "probability"):
        from tensorflow.python.client import pywrap_tf_session

        sig = self.meta.signature_def[signature]
        tensor = lambda info: self.graph.get_tensor_by_name(info.name)._as_tf_output()  # noqa: E731
        fed = {tensor(sig.inputs[k]): np.asarray(v) for k, v in feeds.items()}
        return pywrap_tf_session.TF_SessionRun_wrapper(self.session._session, None, fed,
                                                       [tensor(sig.outputs[output])], [], None)[0]


@pytest.fixture(scope="module")
def server(exports):
    return ServerSession(exports["dlrm"]["export"].path)


def _raw_request(n=3):
    lines = (_split_dir() / "test.txt").read_text().splitlines()[:n]
    fields = [l.split("\t") for l in lines]
    dense = np.array([[float(x) if x else np.nan for x in f[1:14]] for f in fields], np.float32)
    return dense, np.array([[x.encode() for x in f[14:]] for f in fields], dtype=object)


def test_a_well_formed_request_through_the_server_path_matches(server, exports):
    dense, categorical = _raw_request()
    got = server.run("serving_default", {"dense": dense, "categorical": categorical})
    np.testing.assert_allclose(got, exports["dlrm"]["expected"]["probability"][:3], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("case, fragments", [
    ("dense width 12", ["tfdlrm: input dense must be float32 (raw counts) of shape [batch, 13]; got shape] [3 12]"]),
    ("categorical width 25", ["input categorical must be string (raw 8-hex values) of shape [batch, 26]", "[3 25]"]),
    ("dense a vector", ["input dense must be", "got shape] [13]"]),
    ("batch sizes differ", ["inputs dense and categorical must have the same batch size; got] [2] [and] [3]"]),
    ("dense int64", ["Expects arg", "to be float but int64 is provided"]),
    ("categorical float", ["to be string but float is provided"]),
    ("no categorical", ["You must feed a value for placeholder tensor", "categorical"]),
    ("examples int64 count", ["Key: I1", "Data types don't match", "Expected type: float, Actual type: int64"]),
    ("examples two values", ["tfdlrm: tf.Example feature C3 must hold at most one value"]),
    ("examples garbage", ["Could not parse example input"]),
    ("ids out of range", ["tfdlrm: categorical id out of range: feature C2", "got id 100000"]),
    ("ids width 25", ["input sparse must be int64 (categorical ids) of shape [batch, 26]"]),
])
def test_bad_requests_give_invalid_argument_with_a_readable_message(server, case, fragments):
    dense, categorical = _raw_request()
    example = tf.train.Example()
    signature, feeds = "serving_default", {"dense": dense, "categorical": categorical}
    if case == "dense width 12":
        feeds["dense"] = dense[:, :12].copy()
    elif case == "categorical width 25":
        feeds["categorical"] = categorical[:, :25].copy()
    elif case == "dense a vector":
        feeds["dense"] = dense[0].copy()
    elif case == "batch sizes differ":
        feeds["dense"] = dense[:2].copy()
    elif case == "dense int64":
        feeds["dense"] = np.zeros((3, 13), np.int64)
    elif case == "categorical float":
        feeds["categorical"] = np.zeros((3, 26), np.float32)
    elif case == "no categorical":
        del feeds["categorical"]
    elif case.startswith("examples"):
        signature = "examples"
        if case == "examples int64 count":
            example.features.feature["I1"].int64_list.value.append(3)
        elif case == "examples two values":
            example.features.feature["C3"].bytes_list.value.extend([b"2d4ea12b", b"ae46a29d"])
        serialized = b"garbage!" if case == "examples garbage" else example.SerializeToString()
        feeds = {"examples": np.array([serialized], dtype=object)}
    elif case.startswith("ids"):
        signature = "ids"
        sparse = np.ones((3, 26), np.int64)
        if case == "ids out of range":
            sparse[1, 1] = 100_000
        else:
            sparse = sparse[:, :25].copy()
        feeds = {"dense": np.zeros((3, 13), np.float32), "sparse": sparse}
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        server.run(signature, feeds)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message


def test_examples_schema_treats_absent_and_empty_features_as_missing(server):
    """An empty Example (every feature absent) and one with empty lists score alike, as
    the raw row with every value missing does."""
    empty = tf.train.Example()
    lists = tf.train.Example()
    for i in range(1, 14):
        lists.features.feature[f"I{i}"].float_list.SetInParent()
    for i in range(1, 27):
        lists.features.feature[f"C{i}"].bytes_list.value.append(b"")
    examples = np.array([empty.SerializeToString(), lists.SerializeToString()], dtype=object)
    got = server.run("examples", {"examples": examples})
    raw = server.run("serving_default", {"dense": np.full((1, 13), np.nan, np.float32),
                                         "categorical": np.full((1, 26), b"", dtype=object)})
    assert got[0] == got[1] == raw[0]


# -- the command --------------------------------------------------------------------------------------------------
def test_versions_count_up_and_force_replaces_atomically(exports, tmp_path):
    run = str(exports["synthetic"]["run"])
    base = tmp_path / "saved"
    assert export_run(run, out=str(base)).version == 1
    assert export_run(run, out=str(base)).version == 2
    assert versions(base) == [1, 2]
    (base / "1" / "marker").write_text("old")
    assert export_run(run, out=str(base), version=1, force=True).version == 1
    assert not (base / "1" / "marker").exists()
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # no partial or replaced directory left
    assert find_saved_model(base) == base / "2"


def test_a_failed_export_leaves_no_version_behind(exports, tmp_path, monkeypatch):
    from tfdlrm.serving import export

    def broken(path, *args, **kwargs):
        (Path(path) / "saved_model.pb").write_text("half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_saved_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(str(exports["synthetic"]["run"]), out=str(tmp_path / "saved"))
    assert list((tmp_path / "saved").iterdir()) == []


def test_export_command_output(exports, tmp_path, capsys):
    from tfdlrm.cli.main import main

    assert main(["export", str(exports["synthetic"]["run"]), "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert f"to {tmp_path / 's' / '1'}" in printed
    assert "note: the run trained on generated data (synthetic)" in printed and "serving_default  = ids" in printed
    assert main(["export", str(exports["dlrm"]["run"]), "--out", str(tmp_path / "d"), "--version", "7"]) == 0
    printed = capsys.readouterr().out
    assert "serving_default  dense float32 [batch, 13], categorical string [batch, 26] -> probability, logit" in printed
    assert "note:" not in printed and (tmp_path / "d" / "7").is_dir()


@pytest.mark.parametrize("args, fragments", [
    (["export", "{tmp}/missing"], ["run directory", "missing not found"]),
    (["export", "{tmp}/no-checkpoint"], ["has no checkpoint"]),
    (["export", "{tmp}/not-a-run"], ["is not a training run", "run.json not found"]),
    (["export", "{dlrm}", "--out", "{tmp}/taken", "--version", "1"], ["taken/1 exists", "--force replaces it",
                                                                        "next free number, 2"]),
    (["export", "{dlrm}", "--out", "{tmp}/a-file"], ["cannot write exports to", "not a directory"]),
    (["export", "{dlrm}", "--out", "/proc/tfdlrm-exports"], ["cannot write exports to /proc/tfdlrm-exports"]),
    (["export", "{moved}", "--out", "{tmp}/m"], ["has no manifest.json (moved or deleted?)", "--dataset DIR"]),
    (["export", "{dlrm}", "--dataset", "{hash}", "--out", "{tmp}/x"], ["not the manifest the run trained with"]),
    (["train", "--export"], ["--export needs --out"]),
    (["train", "--out", "{tmp}/r", "--export", "{tmp}/a-file"], ["cannot write exports to", "not a directory"]),
])
def test_bad_export_inputs_give_one_line_errors(exports, datasets, tmp_path, capsys, args, fragments):
    import shutil

    from tfdlrm.cli.main import main

    (tmp_path / "no-checkpoint").mkdir()
    shutil.copy(exports["dlrm"]["run"] / "run.json", tmp_path / "no-checkpoint" / "run.json")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "taken" / "1").mkdir(parents=True)
    (tmp_path / "a-file").write_text("")
    moved = tmp_path / "moved"
    shutil.copytree(exports["dlrm"]["run"], moved)
    meta = json.loads((moved / "run.json").read_text())
    meta["data"]["path"] = str(tmp_path / "gone")
    (moved / "run.json").write_text(json.dumps(meta))
    argv = [a.format(tmp=tmp_path, dlrm=exports["dlrm"]["run"], moved=moved, hash=datasets["hash"]) for a in args]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert_clean_error(subprocess.CompletedProcess(argv, code, captured.out, captured.err), *fragments)
    assert not (tmp_path / "r").exists()  # train --export checks the destination before training
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()  # no directory for a failed export


@pytest.mark.parametrize("args, fragments", [
    (["export"], ["RUN_DIR"]),
    (["export", "run", "--version", "x"], ["--version", "integer >= 0"]),
    (["export", "run", "--version", "-1"], ["--version", "integer >= 0"]),
    (["bench", "serving", "--requests", "0"], ["--requests", "positive integer"]),
])
def test_bad_export_flags_give_one_line_errors(args, fragments):
    assert_clean_error(run_cli(*args), *fragments)


def test_bench_serving_prints_latency_and_throughput(exports, tmp_path):
    proc = run_cli("bench", "serving", str(exports["dlrm"]["export"].path.parent), "--requests", "20",
                   "--batches", "2", "--batch-size", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["saved_model"].endswith("/1") and result["signature"] == "serving_default"
    assert result["batch_1"]["requests"] == 20 and 0 < result["batch_1"]["median_ms"] <= result["batch_1"]["p99_ms"]
    assert result["batch_64"]["rows_per_second"] > 0


def test_bench_serving_names_what_it_cannot_bench(exports, tmp_path, capsys):
    from tfdlrm.cli.main import main

    for argv, fragment in ((["bench", "serving", str(tmp_path / "nothing")], "nothing not found"),
                           (["bench", "serving", str(tmp_path)], "holds no SavedModel"),
                           (["bench", "serving", str(exports["synthetic"]["export"].path), "--signature", "examples"],
                            "has no signature 'examples'; it has: ids, serving_default")):
        code = main(argv)
        captured = capsys.readouterr()
        assert_clean_error(subprocess.CompletedProcess(argv, code, captured.out, captured.err), fragment)


def test_multi_hot_models_export_an_ids_signature_of_bags(tmp_path):
    """Random data's bags ([batch, tables, k] ids) through the ids signature."""
    from tfdlrm.presets import get_preset
    from tfdlrm.serving.export import write_saved_model
    from tfdlrm.training.compile import build_model

    config = get_preset("tiny", rows=50).replace(ids_per_lookup=3)
    model = build_model("dlrm", config)
    write_saved_model(tmp_path / "1", model, "dlrm")
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    rng = np.random.default_rng(0)
    dense = rng.random((5, 13), dtype=np.float32)
    sparse = rng.integers(0, 50, (5, 26, 3))
    got = loaded.signatures["serving_default"](dense=tf.constant(dense), sparse=tf.constant(sparse))
    want = model({"dense": dense, "sparse": sparse}).numpy()
    np.testing.assert_allclose(got["probability"].numpy(), want, atol=TOLERANCE, rtol=0)
    sparse[2, 4, 1] = 50
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature C5 .* got id 50"):
        loaded.signatures["ids"](dense=tf.constant(dense), sparse=tf.constant(sparse))
