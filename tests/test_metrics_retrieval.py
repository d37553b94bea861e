"""Youden threshold, balanced accuracy at a threshold (P1) and cross-modal retrieval recall@k."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mmlib import metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- Youden threshold


def test_youden_threshold_hand_derived():
    y = np.array([0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    # J at 0.7: 1/4, 0.6: 2/4, 0.5: 3/4 - 0 = 0.75 (the maximum), 0.4: 3/4 - 1/3, 0.3: 1 - 1/3, 0.2: 1 - 2/3
    assert metrics.youden_threshold(y, s) == 0.5
    assert metrics.youden_threshold(y.astype(bool), list(s)) == 0.5


def test_youden_threshold_tie_rule_takes_the_highest():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9])
    # J = 2/3 both at 0.8 (TPR 2/3, FPR 0) and at 0.35 (TPR 1, FPR 1/3): the higher one wins
    assert metrics.youden_threshold(y, s) == 0.8
    # a scorer that is never better than chance: J = 0 at best, first reached at inf (call nothing positive)
    assert metrics.youden_threshold([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == np.inf


def test_youden_threshold_maximises_balanced_accuracy_over_observed_scores():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = y * 0.8 + rng.normal(0, 1, 300)
    t = metrics.youden_threshold(y, s)
    assert t in s
    best = metrics.balanced_accuracy_at(y, s, t)
    others = [metrics.balanced_accuracy_at(y, s, c) for c in np.unique(s)]
    # J = TPR - FPR = 2 * balanced accuracy - 1, so Youden's threshold maximises balanced accuracy
    assert best == pytest.approx(max(others), abs=1e-12)
    assert best > 0.6 and roc_auc_score(y, s) > 0.6
    # the tie rule: no higher candidate reaches the same value
    assert all(metrics.balanced_accuracy_at(y, s, c) < best - 1e-12 for c in np.unique(s) if c > t)


def test_youden_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        metrics.youden_threshold([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        metrics.youden_threshold([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.youden_threshold([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="one length"):
        metrics.youden_threshold([0, 1, 1], [0.1, 0.3])


# --------------------------------------------------------------------------- balanced accuracy at a threshold


def test_balanced_accuracy_at_hand_example_and_sklearn():
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.7, 0.6, 0.1])
    # threshold 0.5: predictions 1, 0, 1, 1, 0 -> sensitivity 2/3, specificity 1/2
    assert metrics.balanced_accuracy_at(y, s, 0.5) == pytest.approx(7 / 12, abs=1e-12)
    # a score equal to the threshold is positive: at 0.4 sensitivity 1, specificity 1/2
    assert metrics.balanced_accuracy_at(y, s, 0.4) == pytest.approx(0.75, abs=1e-12)
    assert metrics.balanced_accuracy_at(y, s, np.inf) == 0.5
    assert metrics.balanced_accuracy_at(y, s, -np.inf) == 0.5
    rng = np.random.default_rng(1)
    yy, ss = rng.random(200) < 0.3, rng.normal(size=200)
    for t in (-0.5, 0.0, 0.7):
        assert metrics.balanced_accuracy_at(yy, ss, t) == pytest.approx(balanced_accuracy_score(yy, ss >= t), abs=1e-12)


def test_threshold_from_validation_applied_to_test():
    y_val = np.array([0, 0, 1, 0, 1, 1, 1])
    s_val = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    t = metrics.youden_threshold(y_val, s_val)
    y_test = np.array([0, 0, 1, 1])
    s_test = np.array([0.1, 0.6, 0.7, 0.8])
    # with the validation threshold 0.5: predictions 0, 1, 1, 1 -> sensitivity 1, specificity 1/2
    assert metrics.balanced_accuracy_at(y_test, s_test, t) == pytest.approx(0.75)
    # refitting on test (leakage) would give 0.7 and a perfect, optimistic score
    assert metrics.youden_threshold(y_test, s_test) == 0.7
    assert metrics.balanced_accuracy_at(y_test, s_test, metrics.youden_threshold(y_test, s_test)) == 1.0


# --------------------------------------------------------------------------- retrieval recall


def test_retrieval_recall_hand_example():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],  # correct item first: rank 0
        [0.8, 0.5, 0.7, 0.1],  # two items above: rank 2
        [0.3, 0.6, 0.4, 0.2],  # one item above: rank 1
        [0.5, 0.5, 0.5, 0.5],  # tied with three: pessimistic rank 3
    ])
    r = metrics.retrieval_recall(sim, ks=(1, 2, 3, 4))
    assert r == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@4": 1.0,
                 "chance@1": 0.25, "chance@2": 0.5, "chance@3": 0.75, "chance@4": 1.0}
    # the other direction (columns as queries) is the transpose
    rt = metrics.retrieval_recall(sim.T, ks=(1, 2))
    # column 0: 0.9 top -> rank 0; column 1: 0.6 above 0.5, tied 0.5 -> rank 2;
    # column 2: 0.5 >= 0.4 and 0.7 > 0.4 -> rank 2; column 3: 0.5 top, others below -> rank 0
    assert rt["R@1"] == 0.5 and rt["R@2"] == 0.5


def test_retrieval_recall_identity_constant_and_ties():
    n = 6
    r = metrics.retrieval_recall(np.eye(n))
    assert r["R@1"] == 1.0 and r["R@5"] == 1.0
    assert r["chance@1"] == pytest.approx(1 / 6) and r["chance@5"] == pytest.approx(5 / 6)
    c = metrics.retrieval_recall(np.full((n, n), 0.3), ks=(1, 5, 6))
    assert c["R@1"] == 0.0 and c["R@5"] == 0.0 and c["R@6"] == 1.0
    # one tie with the correct item costs one rank
    sim = np.eye(n)
    sim[0, 3] = 1.0
    r = metrics.retrieval_recall(sim, ks=(1, 2))
    assert r["R@1"] == pytest.approx(5 / 6) and r["R@2"] == 1.0


def test_retrieval_recall_matches_argsort_ranks_and_accepts_tensors():
    rng = np.random.default_rng(2)
    n = 40
    img, tab = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    tab = img + 1.5 * tab  # paired embeddings, noisy
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    tab /= np.linalg.norm(tab, axis=1, keepdims=True)
    sim = img @ tab.T
    order = np.argsort(-sim, axis=1)
    rank = np.array([int(np.flatnonzero(order[i] == i)[0]) for i in range(n)])
    r = metrics.retrieval_recall(sim, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert r[f"R@{k}"] == pytest.approx((rank < k).mean())
        assert r[f"chance@{k}"] == pytest.approx(k / n)
    assert r["R@1"] > r["chance@1"] and r["R@1"] <= r["R@5"] <= r["R@10"]
    assert metrics.retrieval_recall(torch.as_tensor(sim), ks=(1, 5, 10)) == r


def test_retrieval_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        metrics.retrieval_recall(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="1..N"):
        metrics.retrieval_recall(np.eye(4), ks=(1, 5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_recall(np.array([[1.0, np.nan], [0.0, 1.0]]), ks=(1,))
