"""Metrics as plain functions, each tested against the library that defines it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mmlib import core

__all__ = ["balanced_accuracy_at", "bootstrap_ci", "concordance_index", "retrieval_recall", "youden_threshold"]


def concordance_index(event: np.ndarray, time: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index: the share of comparable pairs ordered correctly by ``risk``.

    A thin wrapper over :func:`sksurv.metrics.concordance_index_censored` (higher ``risk``
    means earlier events) that accepts any array-like and returns only the estimate.

    Args:
        event: (N,) bool, True where the event was observed.
        time: (N,) event or censoring times.
        risk: (N,) predicted risk scores.
    """
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event, dtype=bool)
    time = np.asarray(time, dtype=float)
    risk = np.asarray(risk, dtype=float)
    if not (event.shape == time.shape == risk.shape) or event.ndim != 1:
        raise ValueError(f"event, time and risk must be 1-D of one length, got {event.shape}, {time.shape}, {risk.shape}")
    return float(concordance_index_censored(event, time, risk)[0])


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    desc: str | None = "bootstrap",
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap confidence interval of ``metric(*arrays)``.

    Subjects are resampled with replacement (the same indices for every array). Resamples on
    which the metric is undefined (it raises, or returns NaN, e.g. no comparable pair) are
    skipped.

    Args:
        metric: a function of the arrays returning a float.
        *arrays: (N, ...) arrays indexed by subject.
        n_boot: number of resamples.
        level: coverage of the interval.
        seed: seed of the resampling generator (independent of global state).
        desc: label of the progress bar (``None`` hides it).

    Returns:
        ``(estimate, lower, upper)``.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"all arrays must have the same length, got {[len(a) for a in arrays]}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    arrays = tuple(np.asarray(a) for a in arrays)
    estimate = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    values = []
    for _ in core.progress(range(n_boot), desc=desc, disable=desc is None, leave=False):
        idx = rng.integers(0, n, n)
        try:
            v = float(metric(*(a[idx] for a in arrays)))
        except (ValueError, ZeroDivisionError):
            continue
        if np.isfinite(v):
            values.append(v)
    if not values:
        raise ValueError("the metric was undefined on every bootstrap resample")
    alpha = (1 - level) / 2
    lower, upper = np.quantile(values, [alpha, 1 - alpha])
    return estimate, float(lower), float(upper)


# --------------------------------------------------------------------------- thresholds (P1)


def _binary_inputs(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and score must be 1-D of one length, got {y.shape} and {s.shape}")
    if not np.isin(y, [0, 1]).all():
        raise ValueError(f"y_true must be binary 0/1 (or bool), got values {np.unique(y)[:5]}")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("y_true needs both classes (sensitivity and specificity are both required)")
    if not np.isfinite(s).all():
        raise ValueError("score contains NaN or infinite values")
    return y, s


def youden_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising Youden's J = TPR - FPR, with positive = ``score >= threshold``.

    Candidates are the thresholds of :func:`sklearn.metrics.roc_curve` (every distinct score,
    ``drop_intermediate=False``, plus ``inf``, where nothing is called positive). Choose it on
    validation data and apply it to test data with :func:`balanced_accuracy_at` (P1).

    Tie rule: among thresholds with the same maximal J, the highest is returned (the fewest
    positive calls, i.e. the most specific operating point). So a scorer no better than chance
    anywhere (max J = 0, reached at ``inf``) gives ``inf``: everything is called negative.

    Args:
        y_true: (N,) binary labels, both classes present.
        score: (N,) scores, higher = more likely positive.

    Returns:
        The threshold: one of the observed scores (or ``inf``).
    """
    from sklearn.metrics import roc_curve

    y, s = _binary_inputs(y_true, score)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    # J compared exactly in integer counts: J * P * N = TP * N - FP * P (floats would break
    # ties such as 2/3 - 0 vs 1 - 1/3 by rounding)
    tp, fp = np.rint(tpr * n_pos).astype(np.int64), np.rint(fpr * n_neg).astype(np.int64)
    j = tp * n_neg - fp * n_pos
    # roc_curve lists thresholds in decreasing order, so the first maximiser is the highest.
    best = int(np.flatnonzero(j == j.max())[0])
    return float(thr[best])


def balanced_accuracy_at(y_true: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """Balanced accuracy (sensitivity + specificity) / 2 with positive = ``score >= threshold``.

    The threshold is an argument, not fitted here, so choosing it on one split (e.g.
    :func:`youden_threshold` on validation) and scoring another cannot leak.

    Args:
        y_true: (N,) binary labels, both classes present.
        score: (N,) scores.
        threshold: decision threshold (``inf`` calls everything negative).
    """
    y, s = _binary_inputs(y_true, score)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    pred = s >= threshold
    sensitivity = pred[y].mean()
    specificity = (~pred[~y]).mean()
    return float((sensitivity + specificity) / 2)


# --------------------------------------------------------------------------- retrieval (P1, P3)


def retrieval_recall(similarity: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of cross-modal retrieval where row i's correct match is column i.

    The rank of row i's correct item is the number of other columns whose similarity is
    ``>=`` the correct one's (0 = retrieved first); recall@k is the share of rows with rank
    ``< k``. Tie rule (pessimistic): every other column tied with the correct one ranks above
    it, so a constant similarity gives recall 0 for every k < N. Rows are queries: pass
    ``similarity.T`` for the other direction (e.g. table -> image).

    Args:
        similarity: (N, N) scores, e.g. cosine similarity of image (rows) and table (columns)
            embeddings; a torch tensor is accepted.
        ks: cut-offs, each in 1..N.

    Returns:
        ``{"R@k": recall, "chance@k": k / N}`` for every k (the chance level of a random
        ranking).
    """
    if hasattr(similarity, "detach"):
        similarity = similarity.detach().cpu().numpy()
    sim = np.asarray(similarity, dtype=float)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square (N, N) matrix, got {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    n = sim.shape[0]
    ks = tuple(int(k) for k in ks)
    if not ks or any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k must lie in 1..N={n}, got {ks}")
    correct = np.diag(sim)[:, None]
    rank = (sim >= correct).sum(axis=1) - 1  # the correct column itself always counts once
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).mean())
    for k in ks:
        out[f"chance@{k}"] = k / n
    return out
