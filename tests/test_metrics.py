import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from mmlib import metrics


def test_concordance_index_known_values():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([True, True, True, True])
    assert metrics.concordance_index(event, time, np.array([4, 3, 2, 1])) == 1.0
    assert metrics.concordance_index(event, time, np.array([1, 2, 3, 4])) == 0.0
    # One discordant pair out of six.
    assert metrics.concordance_index(event, time, np.array([4, 3, 1, 2])) == pytest.approx(5 / 6)


def test_concordance_index_matches_sksurv_with_censoring():
    rng = np.random.default_rng(0)
    time = rng.exponential(10, 200)
    event = rng.random(200) < 0.6
    risk = -time + rng.normal(0, 5, 200)
    expected = concordance_index_censored(event, time, risk)[0]
    assert metrics.concordance_index(event, time, risk) == pytest.approx(expected, abs=0)


def test_concordance_index_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one length"):
        metrics.concordance_index(np.ones(3, bool), np.ones(3), np.ones(4))


def test_bootstrap_ci_brackets_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 400)
    est, lo, hi = metrics.bootstrap_ci(np.mean, x, n_boot=500, seed=3)
    assert est == pytest.approx(x.mean())
    assert lo < est < hi
    # The percentile interval of a mean is close to +-1.96 standard errors.
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert metrics.bootstrap_ci(np.mean, x, n_boot=500, seed=3) == (est, lo, hi)
    assert metrics.bootstrap_ci(np.mean, x, n_boot=500, seed=4) != (est, lo, hi)


def test_bootstrap_ci_skips_undefined_resamples_and_checks_input():
    def picky(x):
        if x.sum() == 0:
            raise ValueError("undefined")
        return float(x.mean())

    x = np.r_[np.zeros(3), 1.0]
    est, lo, hi = metrics.bootstrap_ci(picky, x, n_boot=200, seed=0)
    assert 0 < lo <= hi <= 1
    with pytest.raises(ValueError, match="same length"):
        metrics.bootstrap_ci(lambda a, b: 0.0, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="every bootstrap"):
        metrics.bootstrap_ci(lambda a: float("nan"), np.ones(3), n_boot=5)


def test_single_class_resamples_of_roc_auc_are_skipped_quietly_and_a_single_class_set_still_warns():
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_auc_score

    y, score = np.array([0, 0, 0, 0, 1]), np.array([0.1, 0.3, 0.2, 0.4, 0.9])  # 1 - 0.8**5 = 33% of resamples lack the 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est, lo, hi = metrics.bootstrap_ci(roc_auc_score, y, score, n_boot=100, seed=0)
        paired = metrics.paired_bootstrap_diff(lambda t, s: roc_auc_score(t, s), score, score[::-1], y, n_boot=100)
    assert est == 1.0 and lo == hi == 1.0 and np.isfinite(paired["estimate"])
    assert not [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    # the full set has one class: the reader must hear of it
    with pytest.warns(UndefinedMetricWarning), pytest.raises(ValueError, match="every bootstrap"):
        metrics.bootstrap_ci(roc_auc_score, y[:4], score[:4], n_boot=5)


def test_macro_ovr_auc_matches_sklearn_and_handles_a_missing_class():
    from sklearn.metrics import roc_auc_score

    from mmlib.metrics import macro_ovr_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert macro_ovr_auc(y, prob) == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    # a fold without class 3: the mean over classes 0-2, each against the rest
    keep = y != 3
    expect = np.mean([roc_auc_score(y[keep] == c, prob[keep, c]) for c in range(3)])
    assert macro_ovr_auc(y[keep], prob[keep]) == pytest.approx(expect)
    assert np.isnan(macro_ovr_auc(np.zeros(5, int), prob[:5]))
    with pytest.raises(ValueError, match="outside"):
        macro_ovr_auc(np.array([0, 4]), prob[:2])


def test_ci_verdict_needs_the_interval_to_clear_zero():
    assert metrics.ci_verdict(0.10, 0.02, 0.18) == "yes"
    assert metrics.ci_verdict(0.10, -0.02, 0.18).startswith("partly")
    assert metrics.ci_verdict(0.0004, -0.15, 0.15).startswith("partly")  # "+0.000" is no longer a "yes"
    assert metrics.ci_verdict(0.0, 0.0, 0.0) == "no" and metrics.ci_verdict(-0.1, -0.2, 0.05) == "no"
    assert metrics.ci_verdict(-0.01, 0.01, 0.2) == "no"  # a percentile CI can miss its estimate: both must clear 0
    # lower is better (a mean rank): the mirror image
    assert metrics.ci_verdict(-2.0, -3.0, -1.0, higher_is_better=False) == "yes"
    assert metrics.ci_verdict(-2.0, -3.0, 0.5, higher_is_better=False).startswith("partly")
    assert metrics.ci_verdict(2.0, 1.0, 3.0, higher_is_better=False) == "no"
    assert metrics.ci_verdict(float("nan"), 0.1, 0.2).startswith("no")


def test_ci_verdict_of_a_real_bootstrap():
    # a planted lead is established on 400 subjects, not on 12
    rng = np.random.default_rng(0)

    def verdict(n: int) -> str:
        a = rng.normal(0.3, 1.0, n)
        return metrics.ci_verdict(*metrics.bootstrap_ci(np.mean, a, n_boot=300, seed=1, desc=None))

    assert verdict(400) == "yes"
    assert verdict(12) != "yes"
