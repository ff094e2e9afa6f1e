"""Exports of models trained on your own features: serving_default takes one named [batch]
input per column and gives what the trained model gives on the converted rows; the
tf.Example, transform and ids signatures agree with it; bad requests fail with a message."""
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers.tables import SPEC, make_rows, write_table
from tfdlrm.pipelines.spec import FeatureSpec, example
from tfdlrm.pipelines.tabular import TabularSpec, convert_tabular
from tfdlrm.serving.export import export_run

TOLERANCE = 1e-6


def _requests(rows, spec):
    out = {}
    for column in spec.dense:
        out[column.name] = tf.constant([np.nan if r[column.name] == "" else float(r[column.name]) for r in rows],
                                       tf.float32)
    for column in spec.categorical:
        out[column.name] = tf.constant([r[column.name] for r in rows], tf.string)
    return out


@pytest.fixture(scope="module", params=["dlrm"])  # DCN exports alike (test_export.py covers its graph)
def exported(request, tmp_path_factory):
    from tfdlrm.pipelines.sources import CriteoSource
    from tfdlrm.presets import get_preset
    from tfdlrm.training.loop import train
    from tfdlrm.training.rundir import load_run
    from tfdlrm.training.spec import TrainSpec

    root = tmp_path_factory.mktemp(f"tabular-{request.param}")
    (root / "spec.yaml").write_text(SPEC)
    test_rows = make_rows(200, 7)
    write_table(root / "train.csv", make_rows(600, 6))
    write_table(root / "test.csv", test_rows)
    convert_tabular(TabularSpec(out=str(root / "ds"), features=str(root / "spec.yaml"), train=[str(root / "train.csv")],
                                test=[str(root / "test.csv")]), log=lambda s: None)
    train(TrainSpec(model=request.param, preset="tiny", data=str(root / "ds"), steps_per_epoch=3, batch_size=64, xla="off",
                    optimizer="adagrad", lr=0.05, out=str(root / "run"), verbose=0), log=lambda s: None)
    result = export_run(str(root / "run"), out=str(root / "saved"))
    model, _ = load_run(str(root / "run"), mixed_precision=None)
    source = CriteoSource(root / "ds", get_preset("tiny"))
    probability, sparse = [], []
    for features, _ in source.eval_dataset(64):
        probability.append(model.predict_on_batch(features))
        sparse.append(features["sparse"].to_tensor(-1).numpy())
    width = max(s.shape[2] for s in sparse)
    sparse = np.concatenate([np.pad(s, ((0, 0), (0, 0), (0, width - s.shape[2])), constant_values=-1)
                             for s in sparse])
    return {"loaded": tf.saved_model.load(str(result.path)), "rows": test_rows, "probability":
            np.concatenate(probability), "sparse": sparse, "spec": FeatureSpec.from_dict(
                __import__("yaml").safe_load(SPEC)), "export": result}


def test_serving_default_takes_named_columns(exported):
    fn = exported["loaded"].signatures["serving_default"]
    names = {k: (v.dtype, v.shape.as_list()) for k, v in fn.structured_input_signature[1].items()}
    assert names == {"age": (tf.float32, [None]), "price": (tf.float32, [None]), "region": (tf.string, [None]),
                     "shop": (tf.string, [None]), "labels": (tf.string, [None])}
    out = fn(**_requests(exported["rows"], exported["spec"]))
    np.testing.assert_allclose(out["probability"].numpy(), exported["probability"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(tf.sigmoid(out["logit"]).numpy(), out["probability"].numpy(), atol=1e-7)


def test_examples_transform_and_ids_agree(exported):
    sigs = exported["loaded"].signatures
    rows, spec = exported["rows"], exported["spec"]
    serialized = tf.constant([example(r, spec).SerializeToString() for r in rows])
    by_example = sigs["examples"](examples=serialized)["probability"].numpy()
    np.testing.assert_allclose(by_example, exported["probability"], atol=TOLERANCE, rtol=0)
    transformed = sigs["transform"](**_requests(rows, spec))
    sparse = transformed["sparse"].numpy()
    np.testing.assert_array_equal(sparse, exported["sparse"][:, :, :sparse.shape[2]])
    by_ids = sigs["ids"](dense=transformed["dense"], sparse=transformed["sparse"])["probability"].numpy()
    np.testing.assert_allclose(by_ids, exported["probability"], atol=TOLERANCE, rtol=0)


def test_bad_requests_fail_with_a_message(exported):
    fn = exported["loaded"].signatures["serving_default"]
    request = _requests(exported["rows"][:4], exported["spec"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="tfdlrm: inputs age and region must have the same"):
        fn(**{**request, "region": request["region"][:3]})
    assert exported["export"].description["feature_spec"]["label"] == "bought"
