"""A stand-in for TF Serving, for tests/serving/test_export.py: a fresh process that imports
TensorFlow only (not tfdlrm, pipelines, baselines, tf_keras or tensorflow_recommenders),
loads each export and calls every signature.

    python tests/serving/serving_client.py REQUEST.json OUT.npz

REQUEST: ``{"raw_file": TSV, "exports": [{"name", "path", "ids_npz" (exports without raw
signatures: the dense and sparse inputs to send)}]}``.  OUT holds every output as
``NAME/SIGNATURE/OUTPUT``.  The last line printed is ``RESULT <json>``: the signatures
found and the forbidden modules that were imported (none, if the export is self-contained).

The raw rows are read, and the tf.Example requests built, here from the documented
schema, with no tfdlrm code: the independent side of the comparison.
"""
import json
import math
import sys

import numpy as np
import tensorflow as tf

FORBIDDEN = ("tfdlrm", "pipelines", "baselines", "tf_keras", "tensorflow_recommenders")


def raw_rows(path):
    """float32 [n, 13] counts (NaN = empty) and bytes [n, 26] hex ("" = empty)."""
    dense, categorical = [], []
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            dense.append([float(x) if x else math.nan for x in fields[1:14]])
            categorical.append([x.encode() for x in fields[14:40]])
    return np.array(dense, np.float32), np.array(categorical, dtype=object)


def example(dense_row, categorical_row) -> bytes:
    """The tf.Example schema in docs/serving.md: I1..I13 float_list, C1..C26 bytes_list; missing = absent."""
    feature = {"label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0]))}  # ignored by the model
    for i, x in enumerate(dense_row):
        if not math.isnan(x):
            feature[f"I{i + 1}"] = tf.train.Feature(float_list=tf.train.FloatList(value=[x]))
    for i, value in enumerate(categorical_row):
        if value:
            feature[f"C{i + 1}"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def main(request_file, out_file):
    request = json.load(open(request_file))
    dense, categorical = raw_rows(request["raw_file"])
    examples = np.array([example(d, c) for d, c in zip(dense, categorical)], dtype=object)
    results, signatures = {}, {}
    for entry in request["exports"]:
        loaded = tf.saved_model.load(entry["path"])
        sigs = loaded.signatures
        signatures[entry["name"]] = sorted(sigs)
        calls = {}
        if "transform" in sigs:
            raw = {"dense": tf.constant(dense), "categorical": tf.constant(categorical)}
            calls["serving_default"] = sigs["serving_default"](**raw)
            calls["examples"] = sigs["examples"](examples=tf.constant(examples))
            calls["transform"] = sigs["transform"](**raw)
            calls["ids"] = sigs["ids"](**calls["transform"])
        else:
            inputs = dict(np.load(entry["ids_npz"]))
            calls["serving_default"] = sigs["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
            calls["ids"] = sigs["ids"](**{k: tf.constant(v) for k, v in inputs.items()})
        for signature, outputs in calls.items():
            for key, value in outputs.items():
                results[f"{entry['name']}/{signature}/{key}"] = value.numpy()
    np.savez(out_file, **results)
    loaded_modules = {name.split(".")[0] for name in sys.modules}
    print("RESULT " + json.dumps({"signatures": signatures,
                                  "forbidden": sorted(m for m in FORBIDDEN if m in loaded_modules)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
