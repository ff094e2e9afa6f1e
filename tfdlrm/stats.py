"""Is one model's AUC really higher than another's?  Confidence intervals for AUC differences.

Two ways, both paired (the same rows, the same seeds), in numpy:

* over seeds: the mean of the per-seed differences with a Student t interval;
* over the held-out rows of one pair of runs: DeLong's test for two correlated ROC AUCs
  (DeLong, DeLong & Clarke-Pearson 1988, in Sun & Xu's 2014 O(n log n) form).

A difference whose 95% interval contains 0 is reported as within noise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from tfdlrm.errors import UserError

# Student t quantiles t(0.975, df) for df = 1..30; above 30, t ~ z + (z^3 + z) / (4 df).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return _Z975 + (_Z975 ** 3 + _Z975) / (4 * df)


@dataclass
class Difference:
    """``a - b`` with its 95% confidence interval; ``method`` says how it was computed."""

    a: str
    b: str
    difference: float
    low: float
    high: float
    method: str  # "paired over N seeds (t)" or "DeLong over N held-out rows"
    p_value: Optional[float] = None
    optimizer: Optional[str] = None  # what both runs trained with, in a comparison

    @property
    def within_noise(self) -> bool:
        """True when the interval contains 0 (or could not be computed)."""
        return not (self.low > 0 or self.high < 0)

    def verdict(self) -> str:
        if not all(math.isfinite(v) for v in (self.difference, self.low, self.high)):
            return "not enough runs to tell"
        if self.within_noise:
            return "within noise"
        return f"{self.a} higher" if self.difference > 0 else f"{self.b} higher"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["within_noise"] = self.within_noise
        out["verdict"] = self.verdict()
        return out


def paired_over_seeds(a: str, b: str, auc_a: Sequence[float], auc_b: Sequence[float]) -> Difference:
    """Mean of the per-seed differences ``auc_a[i] - auc_b[i]`` and its t interval.

    With a single pair the interval is unknown (NaN): use :func:`delong` on its predictions.
    """
    if len(auc_a) != len(auc_b) or not auc_a:
        raise ValueError("paired_over_seeds needs as many AUCs for each model, at least one")
    d = [x - y for x, y in zip(auc_a, auc_b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Difference(a, b, mean, float("nan"), float("nan"), "one seed: no interval over seeds")
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Difference(a, b, mean, mean - half, mean + half, f"paired over {len(d)} seeds (t)")


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [x.size]])
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def delong(a: str, b: str, labels, scores_a, scores_b) -> Difference:
    """DeLong's test of ``AUC(scores_a) - AUC(scores_b)`` on the same rows (0/1 ``labels``)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.stack([np.asarray(scores_a, np.float64).ravel(), np.asarray(scores_b, np.float64).ravel()])
    if scores.shape[1] != y.size:
        raise UserError(f"{y.size} labels but {scores.shape[1]} predictions")
    if not np.all((y == 0) | (y == 1)) or not np.all(np.isfinite(scores)):
        raise UserError("DeLong's test needs 0/1 labels and finite predictions")
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise UserError(f"DeLong's test needs at least 2 positives and 2 negatives, got {m} and {n}")
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, z = s[pos], s[neg]
        tx, tz, tall = _midranks(x), _midranks(z), _midranks(np.concatenate([x, z]))
        aucs.append((tall[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v10.append((tall[:m] - tx) / n)  # per positive: share of negatives it outranks
        v01.append(1.0 - (tall[m:] - tz) / m)  # per negative: share of positives that outrank it
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    cov = s10 / m + s01 / n
    diff = aucs[0] - aucs[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if var <= 0:  # identical predictions
        return Difference(a, b, diff, diff, diff, f"DeLong over {y.size:,} held-out rows", 1.0 if diff == 0 else 0.0)
    sd = math.sqrt(var)
    p = math.erfc(abs(diff) / sd / math.sqrt(2))
    return Difference(a, b, diff, diff - _Z975 * sd, diff + _Z975 * sd, f"DeLong over {y.size:,} held-out rows", p)
