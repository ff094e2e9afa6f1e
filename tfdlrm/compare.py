"""Side-by-side comparison: several models (and optimizers, seeds) on the same data.

Every run gets the same data, split, batch size, epochs and seeds; only the model and
optimizer differ.  ``--out DIR`` gets ``runs/<model>-<optimizer>-seed<seed>/`` (one run
each, resumable), ``report.json``, ``report.md`` and ``curves.png``.  See docs/training.md.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tfdlrm.errors import TrainingDiverged, UserError, io_error_text
from tfdlrm.metrics import Evaluation
from tfdlrm.training.loop import train
from tfdlrm.training.rundir import METRICS_FILE, RUN_FILE, write_json
from tfdlrm.training.spec import RunResult, TrainSpec, result_from_dict

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"
METRICS = ("auc", "logloss", "accuracy", "params", "train_seconds", "examples_per_second")
# Settings that may differ between the runs of one comparison.
PER_RUN = ("model", "optimizer", "lr", "embedding_optimizer", "embedding_lr", "seed", "out", "verbose")


@dataclass
class Comparison:
    specs: list[TrainSpec]
    results: list[RunResult]
    teacher_auc: Optional[float]
    command: Optional[str] = None

    def runs(self) -> list[dict]:
        return [run_row(spec, result) for spec, result in zip(self.specs, self.results)]

    def summary(self) -> list[dict]:
        return summarise(self.runs())


def run_row(spec: TrainSpec, result: RunResult) -> dict:
    e = result.evaluation
    return {
        "model": spec.model, "optimizer": spec.optimizer, "lr": spec.lr, "seed": spec.seed,
        "auc": e.auc, "logloss": e.logloss, "accuracy": e.accuracy, "params": result.params,
        "train_seconds": result.train_seconds, "examples_per_second": result.examples_per_second,
        "examples": result.examples, "eval_examples": e.examples, "diverged": result.diverged,
    }


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean and (sample) standard deviation of every metric per model and optimizer,
    over the seeds that finished; seeds whose training diverged are listed apart."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["optimizer"]), []).append(row)
    out = []
    for (model, optimizer), members in groups.items():
        finished = [m for m in members if not m.get("diverged")]
        entry = {"model": model, "optimizer": optimizer, "lr": members[0]["lr"],
                 "seeds": [m["seed"] for m in finished],
                 "diverged_seeds": [m["seed"] for m in members if m.get("diverged")]}
        for metric in METRICS:
            values = [float(m[metric]) for m in finished]
            nan = float("nan")
            entry[f"{metric}_mean"] = statistics.fmean(values) if values else nan
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else nan)
            entry[f"{metric}_min"] = min(values) if values else nan
            entry[f"{metric}_max"] = max(values) if values else nan
        out.append(entry)
    return out


def check_comparable(specs: Sequence[TrainSpec]) -> None:
    """Every spec must share data, split, batch size, budget and preset."""
    if not specs:
        raise UserError("nothing to compare: no models given")
    first = specs[0].to_dict()
    for spec in specs[1:]:
        other = spec.to_dict()
        for key, value in first.items():
            if key not in PER_RUN and other[key] != value:
                raise UserError(f"runs of one comparison must share {key}: {value!r} != {other[key]!r}")
    keys = [(s.model, s.optimizer, s.seed) for s in specs]
    if len(set(keys)) != len(keys):
        raise UserError("the same model, optimizer and seed appear twice in the comparison")


def run_dir_name(spec: TrainSpec) -> str:
    return f"{spec.model}-{spec.optimizer}-seed{spec.seed}"


# Spec fields that do not change a finished run's results.
NOT_RESULTS = ("out", "verbose", "checkpoint_every", "deterministic", "restart", "xla")


def _same_settings(saved: dict, spec: TrainSpec) -> list[str]:
    """``field: saved ..., asked ...`` for each setting that differs; a field the saved run
    predates counts as its default."""
    mine = {k: v for k, v in spec.to_dict().items() if k not in NOT_RESULTS}
    theirs = {**TrainSpec().to_dict(), **saved}
    theirs = {k: v for k, v in theirs.items() if k not in NOT_RESULTS}
    mine, theirs = json.loads(json.dumps(mine)), json.loads(json.dumps(theirs))
    return [f"{k}: saved {theirs.get(k)!r}, asked {mine[k]!r}" for k in mine if theirs.get(k) != mine[k]]


def load_finished(run_dir: Path, spec: TrainSpec) -> Optional[RunResult]:
    """The saved result of ``spec`` in ``run_dir``, None if it has not finished."""
    metrics_path, run_path = run_dir / METRICS_FILE, run_dir / RUN_FILE
    if not metrics_path.is_file() or not run_path.is_file():
        return None
    try:
        saved_spec = json.loads(run_path.read_text())["spec"]
        data = json.loads(metrics_path.read_text())
    except (ValueError, KeyError) as e:
        raise UserError(f"{run_dir} holds unreadable results ({e}); remove it or pass --retrain") from None
    differences = _same_settings(saved_spec, spec)
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
            command: Optional[str] = None, log: Callable[[str], None] = print) -> Comparison:
    """Train every spec in turn (or reuse its finished run under ``out``) and write the report."""
    specs = list(specs)
    check_comparable(specs)
    results = []
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


# -- writing the report ------------------------------------------------------------------
def write_report(report: Comparison, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    first = report.specs[0]
    # How this invocation treated earlier results (restart) is no setting of the runs.
    shared = {k: v for k, v in first.to_dict().items() if k not in PER_RUN + ("restart",)}
    data = {
        "command": report.command,
        "settings": shared,
        "teacher_auc": report.teacher_auc,
        "runs": report.runs(),
        "summary": report.summary(),
        "curves": [{"model": s.model, "optimizer": s.optimizer, "seed": s.seed, "points": r.curve}
                   for s, r in zip(report.specs, report.results)],
    }
    write_json(out / REPORT_JSON, data)
    tmp = out / (REPORT_MD + ".tmp")
    tmp.write_text(format_markdown(report))
    tmp.replace(out / REPORT_MD)
    if any(r.curve for r in report.results):
        plot_curves(data["curves"], out / CURVES_PNG)


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _range(entry: dict, metric: str, digits: int) -> str:
    if not entry["seeds"]:
        return "n/a"
    return f"{_num(entry[f'{metric}_min'], digits)}–{_num(entry[f'{metric}_max'], digits)}"


def _pm(entry: dict, metric: str, digits: int) -> str:
    text = _num(entry[f"{metric}_mean"], digits)
    if len(entry["seeds"]) > 1:
        text += f" ± {_num(entry[f'{metric}_std'], digits)}"
    return text


def format_table(report: Comparison) -> str:
    """The console table: one line per model and optimizer, mean ± std over seeds."""
    summary = report.summary()
    header = (f"{'model':8} {'optimizer':9} {'seeds':>5} {'params':>11} {'AUC':>17} {'log loss':>17} "
              f"{'accuracy':>17} {'examples/s':>10} {'train s':>8}")
    lines = [header, "-" * len(header)]
    for e in summary:
        lines.append(f"{e['model']:8} {e['optimizer']:9} {len(e['seeds']):>5} {_num(e['params_mean']):>11} "
                     f"{_pm(e, 'auc', 4):>17} {_pm(e, 'logloss', 4):>17} {_pm(e, 'accuracy', 4):>17} "
                     f"{_num(e['examples_per_second_mean']):>10} {_num(e['train_seconds_mean'], 1):>8}"
                     + (f"  diverged: seed {','.join(map(str, e['diverged_seeds']))}" if e["diverged_seeds"] else ""))
    if report.teacher_auc is not None:
        lines.append(f"teacher AUC (the ceiling on this synthetic data): {report.teacher_auc:.4f}")
    return "\n".join(lines)


def format_markdown(report: Comparison) -> str:
    first = report.specs[0]
    lines = ["# DLRM vs DCN: held-out comparison", ""]
    if report.command:
        lines += ["Reproduce with:", "", "```sh", report.command, "```", ""]
    lines += [
        f"Data `{first.data}`" + (f" (held out: `{first.eval_data}`)" if first.eval_data else "")
        + f"; preset `{first.preset}`; batch {first.batch_size}; {first.epochs} epoch(s)"
        + (f" of {first.steps_per_epoch} steps" if first.steps_per_epoch else "") + ".",
        "Metrics are exact, over the whole held-out split; ± is the sample standard deviation over seeds.",
        "",
        "| model | optimizer | lr | seeds | params | AUC | log loss | accuracy | AUC range | examples/s | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report.summary():
        lines.append(
            f"| {e['model']} | {e['optimizer']} | {e['lr']} | {','.join(map(str, e['seeds']))} | "
            f"{_num(e['params_mean'])} | {_pm(e, 'auc', 4)} | {_pm(e, 'logloss', 4)} | {_pm(e, 'accuracy', 4)} | "
            f"{_range(e, 'auc', 4)} | {_num(e['examples_per_second_mean'])} | "
            f"{_num(e['train_seconds_mean'], 1)} |")
    diverged = [(e["model"], e["optimizer"], s) for e in report.summary() for s in e["diverged_seeds"]]
    if diverged:
        lines += ["", "Diverged (loss became NaN; left out of the means): "
                  + ", ".join(f"{m} {o} seed {s}" for m, o, s in diverged) + "."]
    if report.teacher_auc is not None:
        lines += ["", f"Teacher AUC on the held-out split (the ceiling for this synthetic data): "
                      f"{report.teacher_auc:.4f}"]
    lines += ["", "## Every run", "", "| model | optimizer | seed | AUC | log loss | accuracy | examples/s |",
              "|---|---|---|---|---|---|---|"]
    for row in report.runs():
        if row["diverged"]:
            lines.append(f"| {row['model']} | {row['optimizer']} | {row['seed']} | diverged | | | |")
            continue
        lines.append(f"| {row['model']} | {row['optimizer']} | {row['seed']} | {row['auc']:.4f} | "
                     f"{row['logloss']:.4f} | {row['accuracy']:.4f} | {_num(row['examples_per_second'])} |")
    if any(r.curve for r in report.results):
        lines += ["", f"![curves]({CURVES_PNG})"]
    return "\n".join(lines) + "\n"


def plot_curves(curves: list[dict], path: Path) -> None:
    """Training and held-out accuracy and log loss against examples seen, averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple, list[list[dict]]] = {}
    for c in curves:
        if c["points"]:
            groups.setdefault((c["model"], c["optimizer"]), []).append(c["points"])
    panels = [("train_accuracy", "training accuracy"), ("eval_accuracy", "held-out accuracy"),
              ("train_logloss", "training log loss"), ("eval_logloss", "held-out log loss")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for (model, optimizer), runs in groups.items():
        length = min(len(r) for r in runs)
        x = np.array([p["examples"] for p in runs[0][:length]])
        for ax, (key, _) in zip(axes.flat, panels):
            y = np.mean([[p[key] for p in r[:length]] for r in runs], axis=0)
            ax.plot(x, y, marker="o", markersize=2.5, label=f"{model.upper()} {optimizer}")
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("examples seen")
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def lr_for(optimizer: str, lr: float | dict) -> float:
    """A single learning rate, or one per optimizer (``{"sgd": 0.1, "adagrad": 0.02}``)."""
    if isinstance(lr, dict):
        if optimizer not in lr:
            raise UserError(f"no learning rate given for optimizer {optimizer!r} (have: {', '.join(lr)})")
        return lr[optimizer]
    return lr
