"""The comparison's report: per-run and per-model tables, AUC differences with intervals.

``report.json`` and ``report.md`` give test metrics at each run's best epoch on the
validation split (tfdlrm/training/callbacks.py, ``EpochEvaluation``) and, per pair of
models, the AUC difference with a 95% interval (tfdlrm/stats.py).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tfdlrm.compare.plots import plot_curves
from tfdlrm.stats import Difference, delong, paired_over_seeds
from tfdlrm.training.rundir import load_predictions, write_json
from tfdlrm.training.spec import RunResult, TrainSpec

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"
METRICS = ("auc", "logloss", "accuracy", "params", "train_seconds", "examples_per_second", "eval_seconds")
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

    def selection(self) -> str:
        """How each run's reported epoch was chosen."""
        if any(any("val" in e for e in r.epochs) for r in self.results):
            return "test metrics at each run's best epoch on the validation split"
        return "test metrics after the last epoch (the data has no validation split to choose an epoch)"

    def differences(self) -> list[Difference]:
        return differences(self.specs, self.results)

    def inputs(self) -> list[dict]:
        """Per model, what it saw (``RunResult.inputs``, from its first run that recorded them)."""
        out: dict[str, dict] = {}
        for spec, result in zip(self.specs, self.results):
            if spec.model not in out or not out[spec.model]:
                out[spec.model] = dict(result.inputs)
        return [{"model": model, **seen} for model, seen in out.items()]

    def like_for_like(self) -> bool:
        """Whether every model saw the same inputs (dense transform, normalisation, vocabulary), among
        the models whose runs recorded them (a diverged run records none; compare checks the
        normalisation of every run before it trains or reuses one)."""
        seen = {tuple(sorted((k, v) for k, v in row.items() if k != "model")) for row in self.inputs()
                if len(row) > 1}
        return len(seen) <= 1


def run_row(spec: TrainSpec, result: RunResult) -> dict:
    """One run's line: test metrics at its best epoch on validation (``selected``), which is
    its last epoch where the data has no validation split; ``final_auc`` is its last epoch's."""
    e = result.evaluation
    chosen = result.selected or e.to_dict()
    return {
        "model": spec.model, "optimizer": spec.optimizer, "lr": spec.lr, "seed": spec.seed,
        "auc": chosen["auc"], "logloss": chosen["logloss"], "accuracy": chosen["accuracy"],
        "best_epoch": result.best_epoch, "stopped_epoch": result.stopped_epoch, "final_auc": e.auc,
        "params": result.params,
        "train_seconds": result.train_seconds, "examples_per_second": result.examples_per_second,
        "eval_seconds": result.eval_seconds, "examples": result.examples, "eval_examples": e.examples, "diverged": result.diverged,
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
        "selection": report.selection(),
        "differences": [d.to_dict() for d in report.differences()],
        "inputs": report.inputs(),
        "like_for_like": report.like_for_like(),
        "curves": [{"model": s.model, "optimizer": s.optimizer, "seed": s.seed, "points": r.curve,
                    "eval_split": "val" if any("val" in e for e in r.epochs) else "test"}
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


def _signed(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.4f}"


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
              f"{'accuracy':>17} {'examples/s':>10} {'train s':>8} {'eval s':>7}")
    lines = [header, "-" * len(header)]
    for e in summary:
        lines.append(f"{e['model']:8} {e['optimizer']:9} {len(e['seeds']):>5} {_num(e['params_mean']):>11} "
                     f"{_pm(e, 'auc', 4):>17} {_pm(e, 'logloss', 4):>17} {_pm(e, 'accuracy', 4):>17} "
                     f"{_num(e['examples_per_second_mean']):>10} {_num(e['train_seconds_mean'], 1):>8} "
                     f"{_num(e['eval_seconds_mean'], 1):>7}"
                     + (f"  diverged: seed {','.join(map(str, e['diverged_seeds']))}" if e["diverged_seeds"] else ""))
    lines.append(evaluation_share(report))
    lines.append(inputs_line(report, markdown=False) + " Dense features: " + "; ".join(
        f"{row['model']} {row.get('dense_norm', 'not recorded')}" for row in report.inputs()) + " (--dense-norm)")
    if report.teacher_auc is not None:
        lines.append(f"teacher AUC (the ceiling on this synthetic data): {report.teacher_auc:.4f}")
    for d in report.differences():
        lines.append(f"AUC {d.a} - {d.b} ({d.optimizer}): {_signed(d.difference)} (95% CI {_signed(d.low)} .. {_signed(d.high)}, "
                     f"{d.method}): {d.verdict()}")
    return "\n".join(lines)


def inputs_line(report: Comparison, markdown: bool = True) -> str:
    if report.like_for_like():
        return "Every model saw the same inputs."
    text = ("**The models saw differently treated inputs** (`--mixed-inputs`): their differences are not "
            "only their architectures'.")
    return text if markdown else text.replace("**", "").replace("`", "")


def evaluation_share(report: Comparison) -> str:
    """One line: the runs' held-out evaluation time (curve points, epoch ends) beside their training time."""
    finished = [r for r in report.results if not r.diverged]
    train = sum(r.train_seconds for r in finished if math.isfinite(r.train_seconds))
    points = sum(len(r.curve) for r in finished)
    curve = sum(r.curve_seconds for r in finished)
    share = f" ({100 * curve / train:.1f}% of the training time)" if train > 0 else ""
    return (f"Held-out evaluation: {points} curve points {curve:.1f} s{share}; epoch ends and the first "
            f"pass of each process (tracing the prediction function) {sum(r.eval_seconds for r in finished) - curve:.1f} "
            f"s; training {train:.1f} s")


def format_markdown(report: Comparison) -> str:
    first = report.specs[0]
    lines = ["# DLRM vs DCN: held-out comparison", ""]
    if report.command:
        lines += ["Reproduce with:", "", "```sh", report.command, "```", ""]
    lines += [
        f"Data `{first.data}`" + (f" (held out: `{first.eval_data}`)" if first.eval_data else "")
        + f"; preset `{first.preset}`; batch {first.batch_size}; {first.epochs} epoch(s)"
        + (f" of {first.steps_per_epoch} steps" if first.steps_per_epoch else "") + ".",
        "Metrics are exact, over the whole held-out (test) split: " + report.selection()
        + "; ± is the sample standard deviation over seeds.",
        "",
        "| model | optimizer | lr | seeds | params | AUC | log loss | accuracy | AUC range | examples/s | train s "
        "| eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report.summary():
        lines.append(
            f"| {e['model']} | {e['optimizer']} | {e['lr']} | {','.join(map(str, e['seeds']))} | "
            f"{_num(e['params_mean'])} | {_pm(e, 'auc', 4)} | {_pm(e, 'logloss', 4)} | {_pm(e, 'accuracy', 4)} | "
            f"{_range(e, 'auc', 4)} | {_num(e['examples_per_second_mean'])} | "
            f"{_num(e['train_seconds_mean'], 1)} | {_num(e['eval_seconds_mean'], 1)} |")
    lines += ["", evaluation_share(report) + " (not in train s)."]
    lines += ["", "## Inputs", "", inputs_line(report), "",
              "| model | dense features | then, in the model (`--dense-norm`) | categorical ids |", "|---|---|---|---|"]
    for row in report.inputs():
        lines.append(f"| {row['model']} | {row.get('dense_transform', 'not recorded')} | "
                     f"{row.get('dense_norm_text', 'not recorded')} | {row.get('vocabulary', 'not recorded')} |")
    diverged = [(e["model"], e["optimizer"], s) for e in report.summary() for s in e["diverged_seeds"]]
    if diverged:
        lines += ["", "Diverged (loss became NaN; left out of the means): "
                  + ", ".join(f"{m} {o} seed {s}" for m, o, s in diverged) + "."]
    if report.teacher_auc is not None:
        lines += ["", f"Teacher AUC on the held-out split (the ceiling for this synthetic data): "
                      f"{report.teacher_auc:.4f}"]
    found = report.differences()
    if found:
        lines += ["", "## Differences", "",
                  "AUC of the first model minus the second's, with a 95% confidence interval: paired over the seeds "
                  "both finished (Student t), or, for a single pair of runs, DeLong's test over the held-out rows. "
                  "An interval that contains 0 is within noise.", "",
                  "| models | optimizer | AUC difference | 95% CI | method | verdict |", "|---|---|---|---|---|---|"]
        for d in found:
            lines.append(f"| {d.a} - {d.b} | {d.optimizer} | {_signed(d.difference)} | {_signed(d.low)} .. "
                         f"{_signed(d.high)} | {d.method} | {d.verdict()} |")
    lines += ["", "## Every run", "",
              "| model | optimizer | seed | best epoch | AUC | log loss | accuracy | last-epoch AUC | examples/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in report.runs():
        if row["diverged"]:
            lines.append(f"| {row['model']} | {row['optimizer']} | {row['seed']} | diverged | | | | | |")
            continue
        best = str(row["best_epoch"] or "n/a") + (f" (early stop after {row['stopped_epoch']})"
                                                  if row.get("stopped_epoch") else "")
        lines.append(f"| {row['model']} | {row['optimizer']} | {row['seed']} | {best} | "
                     f"{row['auc']:.4f} | {row['logloss']:.4f} | {row['accuracy']:.4f} | {_num(row['final_auc'], 4)} | "
                     f"{_num(row['examples_per_second'])} |")
    if any(r.curve for r in report.results):
        lines += ["", f"![curves]({CURVES_PNG})"]
    return "\n".join(lines) + "\n"


def differences(specs: Sequence[TrainSpec], results: Sequence[RunResult]) -> list[Difference]:
    """For each optimizer, each pair of models (in the order given): the AUC difference over
    the seeds both finished, paired by seed; a single pair of runs by DeLong's test on their
    saved held-out predictions (``predictions.npz``), where both have them."""
    runs: dict[tuple, dict[int, tuple[TrainSpec, RunResult]]] = {}
    for spec, result in zip(specs, results):
        if not result.diverged:
            runs.setdefault((spec.optimizer, spec.model), {})[spec.seed] = (spec, result)
    models = list(dict.fromkeys(s.model for s in specs))
    out = []
    for optimizer in dict.fromkeys(s.optimizer for s in specs):
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                ra, rb = runs.get((optimizer, a), {}), runs.get((optimizer, b), {})
                seeds = sorted(set(ra) & set(rb))
                if not seeds:
                    continue
                auc = [[run_row(*r[s])["auc"] for s in seeds] for r in (ra, rb)]
                d = paired_over_seeds(a, b, auc[0], auc[1])
                if len(seeds) == 1:
                    d = _delong_pair(a, b, ra[seeds[0]], rb[seeds[0]]) or d
                d.optimizer = optimizer
                out.append(d)
    return out


def _delong_pair(a: str, b: str, run_a, run_b) -> Optional[Difference]:
    saved = [load_predictions(r.run_dir) if r.run_dir else None for _, r in (run_a, run_b)]
    if any(p is None for p in saved) or saved[0][0].shape != saved[1][0].shape \
            or not (saved[0][0] == saved[1][0]).all():
        return None
    return delong(a, b, saved[0][0], saved[0][1], saved[1][1])
