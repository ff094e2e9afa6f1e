"""Train several models on the same data and put their held-out metrics side by side."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tfdlrm.training import RunResult, TrainSpec, train


@dataclass
class Comparison:
    specs: list[TrainSpec]
    results: list[RunResult]
    teacher_auc: Optional[float]


def compare(specs: Sequence[TrainSpec], out: Optional[str] = None, log: Callable[[str], None] = print) -> Comparison:
    """Train every spec in turn (same data, split, batch size and budget) and collect results."""
    results = []
    for spec in specs:
        if out is not None:
            spec.out = str(Path(out) / f"{spec.model}-{spec.optimizer}-seed{spec.seed}")
        log(f"\n== {spec.model} ({spec.optimizer}, lr {spec.lr}, seed {spec.seed})")
        results.append(train(spec, log=log))
    teacher = next((r.teacher_auc for r in results if r.teacher_auc is not None), None)
    return Comparison(list(specs), results, teacher)


def format_table(report: Comparison) -> str:
    header = f"{'model':8} {'optimizer':9} {'seed':>4} {'params':>11} {'AUC':>7} {'log loss':>8} " \
             f"{'accuracy':>8} {'examples/s':>10} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for spec, r in zip(report.specs, report.results):
        e = r.evaluation
        lines.append(f"{spec.model:8} {spec.optimizer:9} {spec.seed:>4} {r.params:>11,} {e.auc:>7.4f} "
                     f"{e.logloss:>8.4f} {e.accuracy:>8.4f} {_num(r.examples_per_second):>10} "
                     f"{r.train_seconds:>8.1f}")
    if report.teacher_auc is not None:
        lines.append(f"teacher AUC (the ceiling on this synthetic data): {report.teacher_auc:.4f}")
    return "\n".join(lines)


def _num(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.0f}"
