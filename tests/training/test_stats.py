"""tfdlrm/stats.py against independent computations: a bootstrap, brute-force AUCs, known quantiles."""
import math

import numpy as np
import pytest

from tfdlrm.metrics import exact_auc
from tfdlrm.stats import delong, paired_over_seeds, t975


def _brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def _correlated(n=3000, seed=0, gap=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    signal = y + rng.normal(0, 1.2, n)
    a = signal + rng.normal(0, 0.5, n)
    b = signal * (1 - gap) + rng.normal(0, 0.9, n)
    return y, a, b


def test_t_quantiles_match_the_tables():
    assert t975(1) == 12.706 and t975(7) == 2.365 and t975(30) == 2.042
    assert abs(t975(60) - 2.000) < 0.002 and abs(t975(120) - 1.980) < 0.002
    with pytest.raises(ValueError):
        t975(0)


def test_paired_over_seeds_is_the_t_interval_of_the_differences():
    a, b = [0.72, 0.71, 0.73, 0.72], [0.70, 0.70, 0.71, 0.70]
    d = np.array(a) - np.array(b)
    got = paired_over_seeds("dlrm", "dcn", a, b)
    half = 3.182 * d.std(ddof=1) / 2
    assert got.difference == pytest.approx(d.mean())
    assert (got.low, got.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert got.verdict() == "dlrm higher" and not got.within_noise
    noisy = paired_over_seeds("dlrm", "dcn", [0.72, 0.70, 0.71], [0.70, 0.72, 0.71])
    assert noisy.within_noise and noisy.verdict() == "within noise"
    single = paired_over_seeds("dlrm", "dcn", [0.72], [0.70])
    assert math.isnan(single.low) and single.verdict() == "not enough runs to tell"


def test_delong_aucs_and_variance_agree_with_brute_force_and_a_bootstrap():
    y, a, b = _correlated()
    got = delong("a", "b", y, a, b)
    assert got.difference == pytest.approx(_brute_auc(y, a) - _brute_auc(y, b), abs=1e-12)
    assert got.difference == pytest.approx(exact_auc(y, a) - exact_auc(y, b), abs=1e-12)
    rng = np.random.default_rng(1)
    boots = []
    for _ in range(400):
        i = rng.integers(0, y.size, y.size)
        boots.append(exact_auc(y[i], a[i]) - exact_auc(y[i], b[i]))
    delong_sd = (got.high - got.low) / (2 * 1.959964)
    assert delong_sd == pytest.approx(np.std(boots, ddof=1), rel=0.15)
    assert got.low > 0 and got.p_value < 1e-3 and got.verdict() == "a higher"


def test_delong_with_ties_and_identical_predictions():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0], float)
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.4, 0.9, 0.2, 0.4, 0.7, 0.3])
    same = delong("a", "b", y, s, s)
    assert same.difference == 0 and same.within_noise and same.p_value == 1.0
    t = s + np.linspace(0, 0.01, s.size)
    got = delong("a", "b", y, s, t)
    assert got.difference == pytest.approx(_brute_auc(y, s) - _brute_auc(y, t))


def test_delong_finds_no_difference_between_two_equally_good_models():
    rng = np.random.default_rng(3)
    y = (rng.random(4000) < 0.3).astype(float)
    signal = y + rng.normal(0, 1.2, y.size)
    got = delong("a", "b", y, signal + rng.normal(0, 0.3, y.size), signal + rng.normal(0, 0.3, y.size))
    assert got.within_noise and got.p_value > 0.05
