import json

import numpy as np
import pytest

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main
from tfdlrm.compare import CURVES_PNG, REPORT_JSON, REPORT_MD, compare, format_table
from tfdlrm.errors import UserError
from tfdlrm.training.evaluate import predict_with_labels
from tfdlrm.training.rundir import load_run
from tfdlrm.training.spec import TrainSpec

# xla="off": these tests are about comparing and reporting; the compiled step is tested in
# tests/models/test_fast_step.py (its compilation would be most of each tiny run's time).
BASE = dict(preset="tiny", data="synthetic", rows=200, train_examples=8192, eval_examples=2048, batch_size=512,
            optimizer="adagrad", lr=0.05, curve_points=3, verbose=0, xla="off")


def specs(models=("dlrm", "dcn"), seeds=(1, 2), **changes):
    return [TrainSpec(model=m, seed=s, **{**BASE, **changes}) for m in models for s in seeds]


def pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    logs = []
    report = compare(specs(), out=str(out), command="python -m tfdlrm compare ...", log=logs.append)
    return out, report, logs


def test_report_files_are_consistent(finished):
    out, report, _ = finished
    data = json.loads((out / REPORT_JSON).read_text())
    assert len(data["runs"]) == 4
    for entry in data["summary"]:
        runs = [r for r in data["runs"] if r["model"] == entry["model"] and r["optimizer"] == entry["optimizer"]]
        aucs = [r["auc"] for r in runs]
        assert entry["auc_mean"] == pytest.approx(np.mean(aucs))
        assert entry["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
        assert entry["logloss_mean"] == pytest.approx(np.mean([r["logloss"] for r in runs]))
        assert entry["seeds"] == [1, 2]
    for run in data["runs"]:
        metrics = json.loads((out / "runs" / f"{run['model']}-adagrad-seed{run['seed']}" / "metrics.json").read_text())
        assert metrics["evaluation"]["auc"] == run["final_auc"]
        best = [e for e in metrics["epochs"] if e["epoch"] == run["best_epoch"]]
        assert len(best) == 1 and best[0]["test"]["auc"] == run["auc"]  # the test AUC at the best epoch on val
        assert run["best_epoch"] == max(metrics["epochs"], key=lambda e: e["val"]["auc"])["epoch"]
        assert run["params"] > 0 and run["examples_per_second"] > 0 and run["train_seconds"] > 0
        # the held-out evaluations' seconds, apart from the training time: the curve points' and the epoch end's
        assert run["eval_seconds"] == metrics["eval_seconds"] > metrics["curve_seconds"] > 0
    markdown = (out / REPORT_MD).read_text()
    for run in data["runs"]:
        assert f"| {run['model']} | adagrad | {run['seed']} | {run['best_epoch']} | {run['auc']:.4f} |" in markdown
    assert "Teacher AUC" in markdown and f"{data['teacher_auc']:.4f}" in markdown
    assert "python -m tfdlrm compare ..." in markdown
    # every model saw the same inputs, and the report says which
    assert data["like_for_like"] is True
    assert [(i["model"], i["dense_norm"], i["vocabulary"]) for i in data["inputs"]] == [
        ("dlrm", "standardize", "generated ids"), ("dcn", "standardize", "generated ids")]
    assert "Every model saw the same inputs." in markdown
    assert "| dlrm | generated, log-count scale | standardised (training split's mean and variance) |" in markdown
    for run in data["runs"]:
        saved = json.loads((out / "runs" / f"{run['model']}-adagrad-seed{run['seed']}" / "run.json").read_text())
        assert saved["config"]["dense_norm"] == "standardize"
    assert (out / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for curve in data["curves"]:
        assert [p["step"] for p in curve["points"]] == [5, 10, 15, 16]  # 16 steps, every 5, plus the epoch end
        assert all(0 <= p["eval_auc"] <= 1 and 0 <= p["train_accuracy"] <= 1 for p in curve["points"])
    table = format_table(report)
    assert "teacher AUC" in table and "dlrm" in table and "dcn" in table
    curve = sum(r.curve_seconds for r in report.results)
    line = f"Held-out evaluation: 16 curve points {curve:.1f} s ("
    assert line in table and line in markdown and "; epoch ends and the first pass of each process" in table
    assert all(p["eval_examples"] == 2048 for c in data["curves"] for p in c["points"])  # the whole (small) split


def test_reported_auc_equals_an_independent_rank_computation(finished):
    out, report, _ = finished
    model, meta = load_run(str(out / "runs" / "dlrm-adagrad-seed2"))
    from tfdlrm.pipelines.sources import open_data
    from tfdlrm.training.spec import model_config_for

    spec = specs(models=("dlrm",), seeds=(2,))[0]
    data = open_data("synthetic", model_config_for(spec), train_examples=8192, eval_examples=2048)
    labels, scores = predict_with_labels(model, data.eval_dataset(1000))
    reported = next(r for r in report.runs() if r["model"] == "dlrm" and r["seed"] == 2)["auc"]
    assert reported == pytest.approx(pairwise_auc(labels, scores), abs=1e-9)


def test_finished_runs_are_reused_and_retrain_is_explicit(finished):
    out, first, _ = finished
    logs = []
    again = compare(specs(threads="tf"), out=str(out), log=logs.append)  # thread pools change no result
    assert sum("finished earlier, reusing" in line for line in logs) == 4
    assert [r["auc"] for r in again.runs()] == [r["auc"] for r in first.runs()]
    logs = []
    compare(specs(models=("dcn",), seeds=(1,)), out=str(out), retrain=True, log=logs.append)
    assert not any("reusing" in line for line in logs)


def test_results_of_other_settings_are_refused(finished):
    out, _, _ = finished
    with pytest.raises(UserError, match="holds results of other settings .*lr"):
        compare(specs(models=("dlrm",), seeds=(1,), lr=0.2), out=str(out), log=lambda s: None)
    with pytest.raises(UserError, match="holds results of other settings .*dense_norm: saved 'standardize', "
                                        "asked 'none'"):
        compare(specs(models=("dlrm",), seeds=(1,), overrides={"dense_norm": "none"}), out=str(out),
                log=lambda s: None)


def test_models_with_differently_treated_inputs_only_when_asked(tmp_path):
    mixed = [TrainSpec(model="dlrm", seed=1, **{**BASE, "curve_points": 0, "overrides": {"dense_norm": "none"}}),
             TrainSpec(model="dcn", seed=1, **{**BASE, "curve_points": 0})]
    with pytest.raises(UserError, match="differently treated inputs .*dlrm none, dcn standardize.*--mixed-inputs"):
        compare(mixed, out=str(tmp_path), log=lambda s: None)
    assert not (tmp_path / REPORT_JSON).exists()
    report = compare(mixed, out=str(tmp_path), log=lambda s: None, mixed_inputs=True)
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    assert data["like_for_like"] is False and not report.like_for_like()
    assert [(i["model"], i["dense_norm"]) for i in data["inputs"]] == [("dlrm", "none"), ("dcn", "standardize")]
    assert "differently treated inputs" in (tmp_path / REPORT_MD).read_text()
    assert "dlrm none; dcn standardize" in format_table(report)


def test_a_diverging_run_is_reported_not_fatal(tmp_path):
    report = compare([TrainSpec(model="dcn", seed=1, **{**BASE, "optimizer": "sgd", "lr": 1e4, "curve_points": 0}),
                      TrainSpec(model="dlrm", seed=1, **{**BASE, "curve_points": 0})],
                     out=str(tmp_path), log=lambda s: None)
    rows = report.runs()
    assert "diverged" in rows[0]["diverged"] and "step" in rows[0]["diverged"]
    assert rows[1]["diverged"] is None and 0 < rows[1]["auc"] < 1
    assert "dcn sgd seed 1" in (tmp_path / REPORT_MD).read_text()
    assert "Every model saw the same inputs." in (tmp_path / REPORT_MD).read_text()  # the diverged run recorded none
    assert json.loads((tmp_path / REPORT_JSON).read_text())["runs"][0]["auc"] is None


def test_runs_must_share_data_and_budget():
    with pytest.raises(UserError, match="must share batch_size"):
        compare([TrainSpec(model="dlrm", **BASE), TrainSpec(model="dcn", **{**BASE, "batch_size": 64})])
    with pytest.raises(UserError, match="appear twice"):
        compare(specs(models=("dlrm", "dlrm"), seeds=(1,)))


@pytest.mark.parametrize("args, fragments", [
    (["compare", "--models", "dlrm,fm"], ["--models"]),
    (["compare", "--train-examples", "10"], ["at least 1024"]),
    (["compare", "--optimizers", "sgd,adagrad", "--lr", "sgd=0.1"], ["no learning rate", "adagrad"]),
    (["compare", "--lr", "sgd=fast"], ["--lr"]),
    (["compare", "--dense-norm", "minmax"], ["--dense-norm", "standardize, none"]),
    (["compare", "--dense-norm", "dlrm=raw"], ["--dense-norm", "MODEL=VALUE"]),
    (["compare", "--dense-norm", "dlrm=none"], ["differently treated inputs", "--mixed-inputs"]),
    (["train", "--dense-norm", "dlrm=none"], ["for compare", "standardize or none"]),
])
def test_compare_bad_input(args, fragments):
    assert_clean_error(run_main(args), *fragments)


def test_export_best_exports_each_models_best_run_once(finished, tmp_path):
    from tfdlrm.compare import export_best

    out, report, _ = finished
    logs = []
    exports = export_best(report, str(tmp_path), log=logs.append)
    assert sorted(e.model for e in exports) == ["dcn", "dlrm"]
    for e in exports:
        runs = [r for r in report.runs() if r["model"] == e.model]
        best = max(runs, key=lambda r: r["auc"])
        assert e.run_dir.endswith(f"{e.model}-adagrad-seed{best['seed']}")
        assert (tmp_path / e.model / "1" / "saved_model.pb").is_file()
    assert export_best(report, str(tmp_path), log=logs.append) == []  # same checkpoints: nothing new
    assert sum("already exported" in line for line in logs) == 2
    assert sorted(p.name for p in (tmp_path / "dlrm").iterdir()) == ["1"]


def test_compare_export_needs_out():
    assert_clean_error(run_main(["compare", "--export"]), "--export needs --out")


def test_the_report_says_where_early_stop_ended_a_run(finished):
    """A run --early-stop ended before --epochs shows its stop beside its best epoch."""
    import dataclasses

    from tfdlrm.compare.report import Comparison, format_markdown

    _, report, _ = finished
    stopped = [dataclasses.replace(r, stopped_epoch=3, best_epoch=1) if i == 0 else r
               for i, r in enumerate(report.results)]
    markdown = format_markdown(Comparison(report.specs, stopped, report.teacher_auc, report.command))
    first = report.specs[0]
    assert f"| {first.model} | adagrad | {first.seed} | 1 (early stop after 3) |" in markdown
    assert markdown.count("early stop after") == 1
    assert "early stop after" not in format_markdown(report)
