"""Side-by-side comparison: train several models (and optimizers, seeds) on the same data.

Every run gets the same data, split, batch size, epochs and seeds; only the model and
optimizer differ.  ``--out DIR`` gets ``runs/<model>-<optimizer>-seed<seed>/`` (one run
each, resumable), ``report.json``, ``report.md`` and ``curves.png``; the process holds
``DIR/.lock`` while it runs (a second comparison into it is refused).  See docs/training.md.
"""
from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional, Sequence

from tfdlrm.compare.report import (
    CURVES_PNG,
    PER_RUN,
    REPORT_JSON,
    REPORT_MD,
    Comparison,
    write_report,
)
from tfdlrm.errors import TrainingDiverged, UserError, io_error_text
from tfdlrm.metrics import Evaluation
from tfdlrm.presets import ModelConfig
from tfdlrm.training.loop import train
from tfdlrm.training.rundir import METRICS_FILE, RUN_FILE, hold_out_dir, write_json
from tfdlrm.training.spec import RunResult, TrainSpec, model_config_for, result_from_dict


def check_comparable(specs: Sequence[TrainSpec], mixed_inputs: bool = False) -> None:
    """Every spec must share data, split, batch size, budget and preset, and every model its
    inputs' treatment (``dense_norm``) unless ``mixed_inputs``."""
    if not specs:
        raise UserError("nothing to compare: no models given")
    norms = {spec.model: model_config_for(spec).dense_norm for spec in specs}
    if len(set(norms.values())) > 1 and not mixed_inputs:
        raise UserError("the models would see differently treated inputs (dense features: "
                        + ", ".join(f"{m} {v}" for m, v in norms.items())
                        + "): give one --dense-norm, or pass --mixed-inputs to compare them anyway")
    first = specs[0].to_dict()
    for spec in specs[1:]:
        other = spec.to_dict()
        for key, value in first.items():
            if key == "overrides":  # the inputs' treatment is checked above
                value, other_value = _without_norm(value), _without_norm(other[key])
            else:
                other_value = other[key]
            if key not in PER_RUN and other_value != value:
                raise UserError(f"runs of one comparison must share {key}: {value!r} != {other_value!r}")
    keys = [(s.model, s.optimizer, s.seed) for s in specs]
    if len(set(keys)) != len(keys):
        raise UserError("the same model, optimizer and seed appear twice in the comparison")


def _without_norm(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k != "dense_norm"}


def run_dir_name(spec: TrainSpec) -> str:
    return f"{spec.model}-{spec.optimizer}-seed{spec.seed}"


# Spec fields that do not change a finished run's results.
NOT_RESULTS = ("out", "verbose", "log_every", "checkpoint_every", "keep", "deterministic", "restart", "xla",
               "threads")


def _same_settings(saved: dict, spec: TrainSpec) -> list[str]:
    """``field: saved ..., asked ...`` for each setting that differs; a field the saved run
    predates counts as its default."""
    mine = {k: v for k, v in spec.to_dict().items() if k not in NOT_RESULTS}
    theirs = {**TrainSpec().to_dict(), **saved}
    theirs = {k: v for k, v in theirs.items() if k not in NOT_RESULTS}
    mine, theirs = json.loads(json.dumps(mine)), json.loads(json.dumps(theirs))
    for settings in (mine, theirs):  # compared as resolved, by load_finished
        settings["overrides"] = _without_norm(settings.get("overrides") or {})
    return [f"{k}: saved {theirs.get(k)!r}, asked {mine[k]!r}" for k in mine if theirs.get(k) != mine[k]]


def load_finished(run_dir: Path, spec: TrainSpec) -> Optional[RunResult]:
    """The saved result of ``spec`` in ``run_dir``, None if it has not finished."""
    metrics_path, run_path = run_dir / METRICS_FILE, run_dir / RUN_FILE
    if not metrics_path.is_file() or not run_path.is_file():
        return None
    try:
        saved_run = json.loads(run_path.read_text())
        saved_spec = saved_run["spec"]
        data = json.loads(metrics_path.read_text())
        saved_norm = ModelConfig.from_dict(saved_run["config"], saved_run.get("model")).dense_norm
    except (ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"{run_dir} holds unreadable results ({e}); remove it or pass --retrain") from None
    differences = _same_settings(saved_spec, spec)
    asked_norm = model_config_for(spec).dense_norm  # a run from before the flag existed: as it ran
    if saved_norm != asked_norm:
        differences.insert(0, f"dense_norm: saved {saved_norm!r}, asked {asked_norm!r} (--dense-norm {saved_norm} "
                              f"reuses it)")
    if differences:
        raise UserError(f"{run_dir} holds results of other settings ({'; '.join(differences[:3])}); "
                        f"use another --out or pass --retrain")
    return result_from_dict(data)


def diverged_result(spec: TrainSpec, error: TrainingDiverged) -> RunResult:
    """A run that stopped on a NaN loss: no metrics, but a result all the same (saved, so
    that resuming the comparison does not train it again)."""
    nan = float("nan")
    result = RunResult(model=spec.model, evaluation=Evaluation(nan, nan, nan, 0, nan), params=0,
                       train_seconds=nan, examples_per_second=nan, teacher_auc=None, history={},
                       run_dir=spec.out, examples=0, diverged=str(error))
    if spec.out is not None:
        write_json(Path(spec.out) / METRICS_FILE, result.to_dict())
    return result


def compare(specs: Sequence[TrainSpec], out: Optional[str] = None, retrain: bool = False,
            command: Optional[str] = None, log: Callable[[str], None] = print,
            mixed_inputs: bool = False) -> Comparison:
    """Train every spec in turn (or reuse its finished run under ``out``) and write the report.
    The models must see equally treated inputs (one ``dense_norm``) unless ``mixed_inputs``."""
    specs = list(specs)
    check_comparable(specs, mixed_inputs)
    with ExitStack() as held:
        if out is not None:
            hold_out_dir(out, held, hint="wait for that comparison to finish, or use another --out")
        return _compare(specs, out, retrain, command, log)


def _compare(specs: list, out: Optional[str], retrain: bool, command: Optional[str],
             log: Callable[[str], None]) -> Comparison:
    results = []
    memory_checked = False  # every run's memory estimate, once, before the first one trains
    for spec in specs:
        label = f"{spec.model} ({spec.optimizer}, lr {spec.lr}, seed {spec.seed})"
        if out is not None:
            spec.out = str(Path(out) / "runs" / run_dir_name(spec))
            spec.restart = retrain  # else train() resumes a run that was killed part way
            finished = None if retrain else load_finished(Path(spec.out), spec)
            if finished is not None:
                log(f"\n== {label}: finished earlier, reusing {spec.out} (--retrain to train again)")
                results.append(finished)
                continue
        if not memory_checked:
            from tfdlrm.training.memory import check_comparison_memory

            check_comparison_memory(specs)
            memory_checked = True
        log(f"\n== {label}")
        try:
            results.append(train(spec, log=log))
        except TrainingDiverged as e:
            log(f"{spec.model}: {e}")
            results.append(diverged_result(spec, e))
    teacher = next((r.teacher_auc for r in results if r.teacher_auc is not None), None)
    report = Comparison(specs, results, teacher, command)
    if out is not None:
        try:
            write_report(report, Path(out))
        except OSError as e:
            raise UserError(f"cannot write the report in {out}: {io_error_text(e)}") from None
        log(f"\nreport: {Path(out) / REPORT_MD}, {Path(out) / REPORT_JSON}, {Path(out) / CURVES_PNG}")
    return report


# -- exporting the winners ------------------------------------------------------------------
def export_best(report: Comparison, base: Optional[str] = None, log: Callable[[str], None] = print) -> list:
    """Export each model's best run (highest held-out AUC over optimizers and seeds) for
    TF Serving, to ``base/<model>/<version>`` (default ``saved_models/<model>/<version>``).

    A model whose latest exported version came from the same checkpoint is not
    exported again, so rerunning a finished comparison adds no versions.
    """
    import tensorflow as tf

    from tfdlrm.serving.export import (
        EXPORT_INFO,
        EXTRA_DIR,
        default_base,
        export_run,
        versions,
    )

    best: dict[str, tuple[float, TrainSpec]] = {}
    for spec, result in zip(report.specs, report.results):
        auc = result.evaluation.auc
        if result.diverged or spec.out is None or not math.isfinite(auc):
            continue
        if spec.model not in best or auc > best[spec.model][0]:
            best[spec.model] = (auc, spec)
    exports = []
    for model, (auc, spec) in best.items():
        target = Path(base) / model if base else default_base(model)
        checkpoint = tf.train.latest_checkpoint(str(Path(spec.out) / "checkpoints"))
        existing = versions(target)
        if existing and checkpoint:
            info_path = target / str(existing[-1]) / EXTRA_DIR / EXPORT_INFO
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("checkpoint") == str(Path(checkpoint).resolve()):
                log(f"{model}: best run {run_dir_name(spec)} (AUC {auc:.4f}) is already exported as "
                    f"{target / str(existing[-1])}")
                continue
        log(f"{model}: exporting its best run, {run_dir_name(spec)} (AUC {auc:.4f})")
        exports.append(export_run(spec.out, out=str(target), log=log))
    return exports


def lr_for(optimizer: str, lr: float | dict) -> float:
    """A single learning rate, or one per optimizer (``{"sgd": 0.1, "adagrad": 0.02}``)."""
    if isinstance(lr, dict):
        if optimizer not in lr:
            raise UserError(f"no learning rate given for optimizer {optimizer!r} (have: {', '.join(lr)})")
        return lr[optimizer]
    return lr
