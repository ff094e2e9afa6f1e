import numpy as np
import pytest

from tfdlrm.errors import UserError
from tfdlrm.metrics import accuracy, evaluate_predictions, exact_auc, log_loss


def pairwise_auc(labels, scores):
    """AUC by definition: P(score_pos > score_neg) + P(tie) / 2 over all pairs."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_exact_auc_equals_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * labels, 2)  # rounding creates many ties
    assert exact_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_extremes_and_undefined():
    assert exact_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert exact_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert exact_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert np.isnan(exact_auc([1, 1], [0.2, 0.3]))


def test_log_loss_and_accuracy_against_hand_values():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.4, 0.6])
    expected = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(0.4)])
    assert log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    assert accuracy(y, p) == 0.5
    assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped, not infinite


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="empty split"):
        evaluate_predictions([], [])
    with pytest.raises(UserError, match="3 labels but 2 predictions"):
        exact_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(UserError, match="0 or 1"):
        log_loss([0, 2], [0.1, 0.2])
    with pytest.raises(UserError, match="NaN"):
        accuracy([0, 1], [0.1, float("nan")])
