"""QR and MD tables through every export signature, and `export --quantize-embeddings 8|4` (issue 25).

One DLRM with full, QR and MD tables trains a few steps on kaggle_split's rows; its float, 8-bit and
4-bit exports are served by tests/serving/serving_client.py (a TensorFlow-only process) on the raw
held-out rows, and compared with the Keras model: as it is (float) and with its tables replaced by
their numpy-dequantized rows (quantized).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, SHARED_CRITEO
from tfdlrm.layers.quantized import dequantize_rows, quantize_rows, quantized_row_bytes
from tfdlrm.metrics import exact_auc

SIGNATURES = ("serving_default", "examples", "ids")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [16, 7])
def test_each_value_is_within_half_a_step_of_its_row(bits, width):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, width)).astype(np.float32) * rng.uniform(0.01, 3, (50, 1)).astype(np.float32)
    values[3] = 0.25  # a constant row: scale 0, every value exact
    codes, scale, bias = quantize_rows(values, bits)
    assert codes.dtype == np.uint8 and codes.shape == (50, width if bits == 8 else (width + 1) // 2)
    assert scale.dtype == (np.float32 if bits == 8 else np.float16)
    back = dequantize_rows(codes, scale, bias, bits, width)
    step = scale.astype(np.float32)[:, None]
    # half a step, and float16's rounding of the bias (4 bits) on top
    slack = 0 if bits == 8 else np.abs(values).max(axis=1, keepdims=True) * 2 ** -10
    assert np.all(np.abs(back - values) <= step / 2 + slack + 1e-6)
    np.testing.assert_array_equal(back[3], values[3])
    # every code is used where a row spans its range: the min maps to 0, the max to the top code
    unpacked = codes if bits == 8 else np.stack([codes & 15, codes >> 4], -1).reshape(50, -1)[:, :width]
    assert unpacked[0].min() == 0 and unpacked[0].max() == 2 ** bits - 1


@pytest.fixture(scope="module")
def quantized_exports(tmp_path_factory):
    from tfdlrm.pipelines.convert import ConvertSpec, convert
    from tfdlrm.serving.export import export_run
    from tfdlrm.training.loop import train
    from tfdlrm.training.spec import TrainSpec

    split = SHARED_CRITEO / "kaggle_split"
    if not (split / "train.txt").is_file():
        pytest.skip("../shared/data/criteo is not present")
    root = tmp_path_factory.mktemp("quantized")
    data = root / "data"
    convert(ConvertSpec(out=str(data), train=[str(split / "train.txt")], test=[str(split / "test.txt")],
                        min_frequency=2))
    run = root / "run"
    overrides = dict(qr_collisions=4, qr_threshold=500, md_temperature=0.3, md_threshold=0)
    train(TrainSpec(model="dlrm", preset="tiny", data=str(data), steps_per_epoch=6, batch_size=256, xla="off",
                    optimizer="adagrad", lr=0.05, out=str(run), verbose=0, overrides=overrides), log=lambda s: None)
    exports = {bits: export_run(str(run), out=str(root / "saved"), quantize_bits=bits or None)
               for bits in (0, 8, 4)}
    request = {"raw_file": str(split / "test.txt"),
               "exports": [{"name": str(bits), "path": str(e.path)} for bits, e in exports.items()]}
    (root / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}  # TF only
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "serving" / "serving_client.py"),
                           str(root / "request.json"), str(root / "out.npz")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    return {"run": run, "data": data, "exports": exports, "outputs": dict(np.load(root / "out.npz")),
            "client": result}


def _keras_predictions(run, data, bits=None):
    """The run's Keras model on the converted held-out rows: as trained, or with every row table replaced by
    the rows its quantized copy stands for (numpy; rows too narrow to shrink stay float32)."""
    from tfdlrm.pipelines.sources import CriteoSource
    from tfdlrm.training.rundir import load_run

    model, _ = load_run(str(run), mixed_precision=None)
    if bits:
        for table in model.sparse_arch.tables:
            if quantized_row_bytes(table.shape[1], bits) >= 4 * table.shape[1]:
                continue  # too narrow to shrink: exported as float32
            table.assign(dequantize_rows(*quantize_rows(table.numpy(), bits), bits, table.shape[1]))
    source = CriteoSource(data, model.config)
    probabilities, labels = [], []
    for features, label in source.eval_dataset(1024):
        probabilities.append(model.predict_on_batch(features))
        labels.append(label.numpy())
    return np.concatenate(probabilities).ravel(), np.concatenate(labels).ravel(), model


def test_qr_and_md_tables_answer_every_signature_as_the_model_and_quantized_ones_as_their_rows(quantized_exports):
    e = quantized_exports
    assert e["client"]["forbidden"] == []
    float_probability, labels, model = _keras_predictions(e["run"], e["data"])
    kinds = {spec.kind for spec in model.sparse_arch.specs}
    assert kinds == {"full", "qr", "md"}, kinds
    assert len(labels) == 2686
    aucs = {}
    for bits in (0, 8, 4):
        assert e["client"]["signatures"][str(bits)] == ["examples", "ids", "serving_default", "transform"]
        expected = float_probability if not bits else _keras_predictions(e["run"], e["data"], bits)[0]
        for signature in SIGNATURES:
            got = e["outputs"][f"{bits}/{signature}/probability"].ravel()
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{bits} bits {signature}")
        aucs[bits] = exact_auc(labels, e["outputs"][f"{bits}/serving_default/probability"].ravel())
    assert abs(aucs[8] - aucs[0]) <= 0.001, aucs
    assert abs(aucs[4] - aucs[0]) <= 0.01, aucs


def test_quantized_exports_store_codes_instead_of_the_float_tables_and_are_smaller(quantized_exports):
    import tensorflow as tf

    e = quantized_exports
    _, _, model = _keras_predictions(e["run"], e["data"])
    sizes, float_values = {}, {}
    for bits, export in e["exports"].items():
        reader = tf.train.load_checkpoint(str(export.path / "variables" / "variables"))
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
        float_values[bits] = sum(int(np.prod(s)) for k, s in shapes.items() if dtypes[k] == tf.float32)
        codes = [k for k in shapes if dtypes[k] == tf.uint8]
        narrow = [t for t in model.sparse_arch.tables if quantized_row_bytes(t.shape[1], bits or 8) >= 4 * t.shape[1]]
        if bits:
            assert len(codes) == len(model.sparse_arch.tables) - len(narrow)
            info = export.description["quantized_embeddings"]
            assert info["bits"] == bits and info["quantized_table_bytes"] < info["float_table_bytes"]
            assert len(info["tables_kept_float32"]) == len(narrow)
        else:
            assert not codes
        assert export.description["saved_model_bytes"] > 0
        sizes[bits] = sum(f.stat().st_size for f in (export.path / "variables").iterdir())
    # the float tables' values are gone; each row keeps a float32 scale and bias (8 bits; 4 bits: float16)
    for bits, per_row in ((8, 2), (4, 0)):  # 8 bits: a float32 scale and bias a row; 4 bits: float16 ones
        kept = [t for t in model.sparse_arch.tables if quantized_row_bytes(t.shape[1], bits) >= 4 * t.shape[1]]
        quantized = [t for t in model.sparse_arch.tables if all(t is not k for k in kept)]
        assert float_values[bits] == float_values[0] - sum(int(np.prod(t.shape)) - per_row * int(t.shape[0])
                                                           for t in quantized), bits
    assert sizes[4] < sizes[8] < sizes[0]  # the weights on disk (the graph of 4 signatures is the same size)


def test_quantization_bits_other_than_8_or_4_are_refused_in_one_line(tmp_path):
    from tests.helpers import run_cli

    proc = run_cli("export", str(tmp_path), "--quantize-embeddings", "16")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "8|4" in proc.stderr or "choose from" in proc.stderr
