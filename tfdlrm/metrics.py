"""Exact evaluation metrics over all predictions (numpy; no TensorFlow).

Keras's ``AUC`` metric buckets predictions into thresholds; these are exact and
are what reports quote.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tfdlrm.errors import UserError

EPSILON = 1e-12


def _arrays(labels, scores):
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise UserError(f"{y.size} labels but {s.size} predictions")
    if y.size == 0:
        raise UserError("cannot evaluate on an empty split (no examples)")
    if not np.all((y == 0) | (y == 1)):
        raise UserError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise UserError(f"{int(np.sum(~np.isfinite(s)))} predictions are NaN or infinite")
    return y, s


def exact_auc(labels, scores) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, ties given their average rank.

    NaN when the labels are all 0 or all 1 (AUC is undefined then).
    """
    y, s = _arrays(labels, scores)
    positives = y.sum()
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    # Average rank (1-based) of each group of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(labels, probabilities) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-12, 1 - 1e-12]."""
    y, p = _arrays(labels, probabilities)
    p = np.clip(p, EPSILON, 1.0 - EPSILON)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def accuracy(labels, probabilities, threshold: float = 0.5) -> float:
    y, p = _arrays(labels, probabilities)
    return float(np.mean((p > threshold) == (y == 1)))


@dataclass(frozen=True)
class Evaluation:
    auc: float
    logloss: float
    accuracy: float
    examples: int
    positive_rate: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"exact AUC {self.auc:.4f}  log loss {self.logloss:.4f}  accuracy {self.accuracy:.4f}  "
                f"({self.examples:,} examples, {self.positive_rate:.1%} positive)")


def evaluate_predictions(labels, probabilities) -> Evaluation:
    y, p = _arrays(labels, probabilities)
    return Evaluation(
        auc=exact_auc(y, p),
        logloss=log_loss(y, p),
        accuracy=accuracy(y, p),
        examples=int(y.size),
        positive_rate=float(y.mean()),
    )
