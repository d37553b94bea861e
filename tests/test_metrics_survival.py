"""Survival metrics (P4): Harrell / Uno c, time-dependent AUC, integrated Brier, paired bootstrap."""

import numpy as np
import pytest
from scipy.stats import norm
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.util import Surv

from mmlib import metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _simulate(n: int, seed: int, censor_scale: float = 2.0):
    """Exponential survival with hazard exp(x): ``x`` is a real risk signal (c around 0.7)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    event_time = rng.exponential(1 / np.exp(x))
    censor_time = rng.exponential(censor_scale, n)
    return event_time <= censor_time, np.minimum(event_time, censor_time), x


# --------------------------------------------------------------------------- Harrell


def test_harrell_c_is_concordance_index_not_a_copy():
    assert metrics.harrell_c is metrics.concordance_index
    assert {"harrell_c", "uno_c", "time_dependent_auc", "integrated_brier", "paired_bootstrap_diff"} <= set(
        metrics.__all__
    )


def test_harrell_c_hand_count_with_censoring_and_a_tie():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.array([True, False, True, True, False])
    risk = np.array([0.9, 0.5, 0.3, 0.6, 0.3])
    # Comparable pairs: i has an event and time[i] < time[j] (censored subjects 2 and 5 only
    # ever appear as the later member):
    #   i=1 (r .9): j=2 (.5) C, j=3 (.3) C, j=4 (.6) C, j=5 (.3) C   -> 4 concordant
    #   i=3 (r .3): j=4 (.6) D, j=5 (.3) tie                         -> 1 discordant, 1 tied
    #   i=4 (r .6): j=5 (.3) C                                       -> 1 concordant
    # 7 pairs: 5 concordant, 1 discordant, 1 tied in risk -> (5 + 0.5) / 7.
    assert metrics.harrell_c(event, time, risk) == pytest.approx(5.5 / 7, abs=1e-12)
    c, concordant, discordant, tied_risk, _ = concordance_index_censored(event, time, risk)
    assert (concordant, discordant, tied_risk) == (5, 1, 1)
    assert metrics.harrell_c(event, time, risk) == c
    # 0/1 ints are accepted as events
    assert metrics.harrell_c(event.astype(int), time, risk) == c


def test_harrell_c_perfect_and_reversed_ranking_with_censoring():
    event, time, _ = _simulate(60, 0)
    assert 0 < event.mean() < 1
    assert metrics.harrell_c(event, time, -time) == 1.0
    assert metrics.harrell_c(event, time, time) == 0.0


def test_harrell_c_errors_name_the_argument():
    e, t, r = np.array([True, False, True]), np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="risk .*one length"):
        metrics.harrell_c(e, t, r[:2])
    with pytest.raises(ValueError, match="time .*one length"):
        metrics.harrell_c(e, t[:2], r)
    with pytest.raises(ValueError, match="risk contains NaN"):
        metrics.harrell_c(e, t, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="time contains NaN"):
        metrics.harrell_c(e, np.array([1.0, np.nan, 3.0]), r)
    with pytest.raises(ValueError, match="no events"):
        metrics.harrell_c(np.zeros(3, bool), t, r)
    with pytest.raises(ValueError, match="bool or 0/1"):
        metrics.harrell_c(np.array([0, 2, 1]), t, r)


# --------------------------------------------------------------------------- Uno


def test_uno_c_without_censoring_equals_harrell():
    rng = np.random.default_rng(1)
    time = rng.exponential(1.0, 80)
    event = np.ones(80, bool)
    risk = -time + rng.normal(0, 0.7, 80)
    harrell = metrics.harrell_c(event, time, risk)
    assert 0.6 < harrell < 0.95
    assert metrics.uno_c(event, time, event, time, risk) == pytest.approx(harrell, abs=1e-9)
    # an uncensored training set of its own (covering the test follow-up) gives G = 1 too
    train_time = np.r_[rng.exponential(1.0, 50), time.max() + 1]
    assert metrics.uno_c(np.ones(51, bool), train_time, event, time, risk) == pytest.approx(harrell, abs=1e-9)


def test_uno_c_with_censoring_reweights_and_matches_sksurv():
    event, time, x = _simulate(150, 2, censor_scale=0.7)
    train_event, train_time, _ = _simulate(300, 3, censor_scale=0.7)
    tau = np.quantile(time[event], 0.8)
    cut = train_time.max() * 0.99  # test follow-up must stay inside the training follow-up
    event, time = event & (time < cut), np.minimum(time, cut)
    y_train, y_test = Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time)
    for t in (None, tau):
        expected = concordance_index_ipcw(y_train, y_test, x, tau=t)[0]
        assert metrics.uno_c(train_event, train_time, event, time, x, tau=t) == pytest.approx(expected, abs=1e-12)
    # the weights matter: with heavy censoring Uno's c is not Harrell's
    assert abs(metrics.uno_c(train_event, train_time, event, time, x) - metrics.harrell_c(event, time, x)) > 1e-4
    assert metrics.uno_c(train_event, train_time, event, time, -time) == pytest.approx(1.0)


def test_uno_c_errors():
    e, t = np.array([True, True, True, False]), np.array([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="train_time .*one length"):
        metrics.uno_c(e, t[:3], e, t, -t)
    with pytest.raises(ValueError, match="risk contains NaN"):
        metrics.uno_c(e, t, e, t, np.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="event has no events"):
        metrics.uno_c(e, t, np.zeros(4, bool), t, -t)
    with pytest.raises(ValueError, match="before tau"):
        metrics.uno_c(e, t, e, t, -t, tau=0.5)
    # test events beyond the training follow-up: a clear message instead of sksurv's, and tau fixes it
    short_e, short_t = np.array([True, True]), np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="training follow-up"):
        metrics.uno_c(short_e, short_t, e, t, -t)
    assert metrics.uno_c(short_e, short_t, e, t, -t, tau=2.0) == 1.0


# --------------------------------------------------------------------------- time-dependent AUC


def test_time_dependent_auc_perfect_risk_is_one_everywhere_and_matches_sksurv():
    event, time, x = _simulate(300, 4)
    times = np.quantile(time[event], [0.1, 0.3, 0.5, 0.7, 0.9])
    auc, mean_auc = metrics.time_dependent_auc(event, time, event, time, -time, times)
    assert isinstance(auc, np.ndarray) and auc.shape == (5,) and isinstance(mean_auc, float)
    np.testing.assert_allclose(auc, 1.0, atol=1e-12)
    assert mean_auc == pytest.approx(1.0)
    # a noisy but informative risk: strictly between chance and perfect, equal to sksurv
    auc, mean_auc = metrics.time_dependent_auc(event, time, event, time, x, times)
    y = Surv.from_arrays(event, time)
    exp_auc, exp_mean = cumulative_dynamic_auc(y, y, x, times)
    np.testing.assert_allclose(auc, exp_auc, atol=1e-12)
    assert mean_auc == pytest.approx(exp_mean, abs=1e-12)
    assert ((auc > 0.6) & (auc < 0.95)).all()
    # reversed risk is 0 everywhere
    np.testing.assert_allclose(metrics.time_dependent_auc(event, time, event, time, time, times)[0], 0.0, atol=1e-12)


def test_time_dependent_auc_times_errors():
    event, time, x = _simulate(100, 5)
    ok = np.quantile(time[event], [0.2, 0.5])
    with pytest.raises(ValueError, match="follow-up range of the test data"):
        metrics.time_dependent_auc(event, time, event, time, x, [ok[0], time.max()])
    with pytest.raises(ValueError, match="follow-up range of the test data"):
        metrics.time_dependent_auc(event, time, event, time, x, [time.min() - 1, ok[0]])
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.time_dependent_auc(event, time, event, time, x, ok[::-1])
    with pytest.raises(ValueError, match="first test event"):
        first = time[event].min()
        before = time[time < first]
        assert before.size  # a censored subject precedes the first event in this draw
        metrics.time_dependent_auc(event, time, event, time, x, [before.min(), ok[1]])
    with pytest.raises(ValueError, match="risk must be 1-D"):
        metrics.time_dependent_auc(event, time, event, time, x[:-1], ok)


# --------------------------------------------------------------------------- integrated Brier


def test_integrated_brier_perfect_curves_are_zero_and_constant_half_is_quarter():
    event, time, _ = _simulate(500, 6)
    times = np.linspace(np.quantile(time, 0.05), np.quantile(time, 0.9), 15)
    perfect = (time[:, None] > times[None, :]).astype(float)
    assert metrics.integrated_brier(event, time, event, time, perfect, times) == pytest.approx(0.0, abs=1e-12)
    half = np.full((len(time), len(times)), 0.5)
    # with the censoring weights fitted on the same data they average exactly 1 (no ties)
    assert metrics.integrated_brier(event, time, event, time, half, times) == pytest.approx(0.25, abs=1e-9)
    # and close to 1 with an independent training sample
    train_event, train_time, _ = _simulate(2000, 7)
    assert metrics.integrated_brier(train_event, train_time, event, time, half, times) == pytest.approx(
        0.25, abs=0.02
    )
    # a reversed curve is far worse than the uninformative one
    assert metrics.integrated_brier(event, time, event, time, 1 - perfect, times) > 0.9


def test_integrated_brier_errors():
    event, time, _ = _simulate(100, 8)
    times = np.quantile(time, [0.2, 0.5, 0.8])
    probs = np.full((100, 3), 0.5)
    with pytest.raises(ValueError, match="follow-up range of the test data"):
        metrics.integrated_brier(event, time, event, time, probs, [times[0], times[1], time.max() + 1])
    with pytest.raises(ValueError, match="at least two"):
        metrics.integrated_brier(event, time, event, time, probs[:, :1], times[:1])
    with pytest.raises(ValueError, match="survival_probs must be 2-D with 3 columns"):
        metrics.integrated_brier(event, time, event, time, probs[:, :2], times)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        metrics.integrated_brier(event, time, event, time, probs + 0.6, times)
    with pytest.raises(ValueError, match="train_event must be a non-empty 1-D"):
        metrics.integrated_brier(np.ones((2, 2), bool), np.ones((2, 2)), event, time, probs, times)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_of_harrell_c_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (150, 600):
        event, time, x = _simulate(n, n)
        est, lo, hi = metrics.bootstrap_ci(metrics.harrell_c, event, time, x, n_boot=150, seed=1, desc=None)
        assert lo < est < hi
        assert 0.6 < est < 0.85  # the simulated risk signal is real
        widths.append(hi - lo)
    # standard errors scale as 1 / sqrt(N): 4x the subjects, about half the width
    assert 0.35 < widths[1] / widths[0] < 0.7


def test_paired_bootstrap_model_against_itself():
    event, time, x = _simulate(80, 9)
    out = metrics.paired_bootstrap_diff(metrics.harrell_c, x, x.copy(), event, time, n_boot=50, desc=None)
    assert out["estimate"] == 0.0
    assert (out["lower"], out["upper"]) == (0.0, 0.0)
    assert out["p_value"] == 1.0
    assert out["a"] == out["b"] == metrics.harrell_c(event, time, x)
    assert out["n_valid"] == 50


def test_paired_bootstrap_clearly_better_model():
    event, time, x = _simulate(200, 10)
    noisy = x + np.random.default_rng(11).normal(0, 2.0, len(x))
    out = metrics.paired_bootstrap_diff(metrics.harrell_c, x, noisy, event, time, n_boot=100, seed=3, desc=None)
    assert out["estimate"] == pytest.approx(metrics.harrell_c(event, time, x) - metrics.harrell_c(event, time, noisy))
    assert out["estimate"] > 0.05
    assert 0 < out["lower"] < out["estimate"] < out["upper"]
    assert out["p_value"] < 0.05
    # swapping the models flips the sign, not the evidence
    swapped = metrics.paired_bootstrap_diff(metrics.harrell_c, noisy, x, event, time, n_boot=100, seed=3, desc=None)
    assert swapped["estimate"] == -out["estimate"]
    assert swapped["upper"] < 0
    assert swapped["p_value"] == out["p_value"]


def test_paired_bootstrap_p_value_is_two_sided_and_matches_normal_theory():
    # metric = mean score: the paired difference is mean(a - b), whose bootstrap distribution
    # is close to normal with the standard error of the mean difference
    rng = np.random.default_rng(12)
    b = rng.normal(0, 1, 400)
    d = rng.normal(0, 1, 400)
    d = d - d.mean() + 1.5 * d.std(ddof=1) / np.sqrt(400)  # observed z = 1.5 exactly
    out = metrics.paired_bootstrap_diff(np.mean, b + d, b, n_boot=2000, seed=0, desc=None)
    se = d.std(ddof=1) / np.sqrt(400)
    assert out["estimate"] == pytest.approx(1.5 * se)
    assert out["p_value"] == pytest.approx(2 * norm.sf(1.5), abs=0.03)  # 0.134; one-sided would be 0.067
    assert out["upper"] - out["lower"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    # the same seed gives the same answer
    assert metrics.paired_bootstrap_diff(np.mean, b + d, b, n_boot=2000, seed=0, desc=None) == out


def test_paired_bootstrap_skips_undefined_resamples_and_raises_past_half():
    ids = np.arange(50)
    s = np.linspace(0, 1, 50)

    def needs_subject_0(i, scores):  # undefined on ~37% of resamples
        if not (i == 0).any():
            raise ValueError("subject 0 missing")
        return float(scores.mean())

    out = metrics.paired_bootstrap_diff(needs_subject_0, s, s[::-1], ids, n_boot=200, desc=None)
    assert 100 < out["n_valid"] < 160

    def needs_subject_0_once(i, scores):  # undefined on ~63% of resamples
        if (i == 0).sum() != 1:
            return float("nan")
        return float(scores.mean())

    with pytest.raises(ValueError, match="more than half"):
        metrics.paired_bootstrap_diff(needs_subject_0_once, s, s[::-1], ids, n_boot=200, desc=None)


def test_paired_bootstrap_errors():
    event, time, x = _simulate(30, 13)
    with pytest.raises(ValueError, match="b_scores"):
        metrics.paired_bootstrap_diff(metrics.harrell_c, x, x[:-1], event, time, desc=None)
    with pytest.raises(ValueError, match=r"arrays\[1\]"):
        metrics.paired_bootstrap_diff(metrics.harrell_c, x, x, event, time[:-1], desc=None)
    with pytest.raises(ValueError, match="level"):
        metrics.paired_bootstrap_diff(metrics.harrell_c, x, x, event, time, level=1.5, desc=None)
    with pytest.raises(ValueError, match="no events"):
        metrics.paired_bootstrap_diff(metrics.harrell_c, x, x, np.zeros(30, bool), time, desc=None)


def test_concordance_bootstrap_equals_the_loop_over_scikit_survival():
    """Same resamples, same values as bootstrap_ci / paired_bootstrap_diff, with tied times and tied scores."""
    rng = np.random.default_rng(1)
    n = 60
    event = rng.random(n) < 0.5
    time = rng.integers(1, 20, n).astype(float)  # many tied times
    scores = np.round(rng.normal(size=(n, 2)), 1)  # many tied scores
    est, samples = metrics.concordance_bootstrap(event, time, scores, n_boot=200, seed=3)
    for m in range(2):
        assert est[m] == pytest.approx(metrics.concordance_index(event, time, scores[:, m]), abs=1e-12)
    _, lo, hi = metrics.bootstrap_ci(metrics.concordance_index, event, time, scores[:, 0], n_boot=200, seed=3,
                                     desc=None)
    finite = samples[:, 0][np.isfinite(samples[:, 0])]
    assert np.allclose(np.quantile(finite, [0.025, 0.975]), [lo, hi], atol=1e-12)
    slow = metrics.paired_bootstrap_diff(metrics.concordance_index, scores[:, 0], scores[:, 1], event, time,
                                         n_boot=200, seed=3, desc=None)
    fast = metrics.paired_summary(est[0], est[1], samples[:, 0] - samples[:, 1], n_boot=200)
    for key in ("estimate", "lower", "upper", "p_value", "n_valid"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12), key
    with pytest.raises(ValueError, match="scores must be"):
        metrics.concordance_bootstrap(event, time, scores[:-1])
