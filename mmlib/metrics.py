"""Metrics as plain functions, each tested against the library that defines it."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from mmlib import core

__all__ = [
    "balanced_accuracy_at",
    "bootstrap_ci",
    "concordance_bootstrap",
    "concordance_index",
    "harrell_c",
    "integrated_brier",
    "macro_ovr_auc",
    "paired_bootstrap_diff",
    "paired_summary",
    "retrieval_ranks",
    "retrieval_recall",
    "time_dependent_auc",
    "uno_c",
    "youden_threshold",
]


def concordance_index(event: np.ndarray, time: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index: the share of comparable pairs ordered correctly by ``risk``.

    A thin wrapper over :func:`sksurv.metrics.concordance_index_censored` (higher ``risk``
    means earlier events) that accepts any array-like and returns only the estimate. Also
    exported as :data:`harrell_c` (the same function); see :func:`uno_c` for the
    censoring-adjusted version.

    Args:
        event: (N,) bool (or 0/1), True where the event was observed; at least one event.
        time: (N,) event or censoring times.
        risk: (N,) predicted risk scores, finite.

    Raises:
        ValueError: naming the offending argument, for mismatched lengths, NaN risks or
            times, non-binary events, no events, or no comparable pair.
    """
    from sksurv.metrics import concordance_index_censored

    event, time = _event_time(event, time)
    risk = _subject_scores(risk, len(event), "risk", ref="event")
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
    values = _bootstrap_values(metric, arrays, n_boot=n_boot, seed=seed, desc=desc)
    if not values:
        raise ValueError("the metric was undefined on every bootstrap resample")
    alpha = (1 - level) / 2
    lower, upper = np.quantile(values, [alpha, 1 - alpha])
    return estimate, float(lower), float(upper)


# --------------------------------------------------------------------------- thresholds (P1)


def ci_verdict(estimate: float, lower: float, upper: float, *, higher_is_better: bool = True) -> str:
    """Whether a claimed difference held, from its estimate and confidence interval.

    ``"yes"`` when the whole interval lies on the claimed side of 0; ``"partly: ..."`` when the
    estimate does but the interval reaches 0 (one seed and a small test split: a lead the data
    do not establish); ``"no"`` otherwise (an estimate of exactly 0 included). For a difference
    where lower is better (a mean rank, a loss) pass ``higher_is_better=False``.
    """
    values = (float(estimate), float(lower), float(upper))
    if not all(np.isfinite(values)):
        return "no: the difference is undefined on this run"
    e, lo, _ = values if higher_is_better else (-values[0], -values[2], -values[1])
    if e <= 0:
        return "no"
    # a percentile bootstrap interval need not contain the estimate; both must clear 0
    return "yes" if lo > 0 else "partly: ahead, but the 95% CI reaches 0"


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


def macro_ovr_auc(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``y_true``.

    Equal to ``sklearn.metrics.roc_auc_score(y, prob, multi_class="ovr", average="macro")`` when
    every class occurs, but a held-out fold that lacks a rare class still gets a value (the mean
    over the classes it has, each scored by its own probability column) instead of an error.

    Args:
        y_true: (N,) integer class labels in ``[0, C)``.
        prob: (N, C) class scores (probabilities or logits; only their ranks per column matter).

    Returns:
        The mean AUC, or NaN when fewer than two classes occur.

    Raises:
        ValueError: on mismatched shapes or labels outside ``[0, C)``.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"prob must be (N, C) and y_true (N,), got {p.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true holds labels outside [0, {p.shape[1]}): range [{y.min()}, {y.max()}]")
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))


def retrieval_ranks(similarity: np.ndarray) -> np.ndarray:
    """Per query (row), the rank of its correct item (column i): the number of other columns
    scored ``>=`` it, so 0 = retrieved first and a tie counts against the model. Row i is a hit
    at k when its rank is ``< k`` (:func:`retrieval_recall` averages that over the rows)."""
    if hasattr(similarity, "detach"):
        similarity = similarity.detach().cpu().numpy()
    sim = np.asarray(similarity, dtype=float)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square (N, N) matrix, got {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    correct = np.diag(sim)[:, None]
    return (sim >= correct).sum(axis=1) - 1  # the correct column itself always counts once


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
    rank = retrieval_ranks(similarity)
    n = len(rank)
    ks = tuple(int(k) for k in ks)
    if not ks or any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k must lie in 1..N={n}, got {ks}")
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).mean())
    for k in ks:
        out[f"chance@{k}"] = k / n
    return out


# --------------------------------------------------------------------------- survival (P2, P4)

# Harrell's c-index is :func:`concordance_index` (already a wrapper over sksurv); this is the
# same function under the name used next to :func:`uno_c`, not a second implementation.
harrell_c = concordance_index


def _event_time(
    event: np.ndarray,
    time: np.ndarray,
    *,
    names: tuple[str, str] = ("event", "time"),
    need_event: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(event as bool, time as float)``; errors name the offending argument."""
    event_name, time_name = names
    e = np.asarray(event)
    t = np.asarray(time, dtype=float)
    if e.ndim != 1 or e.size == 0:
        raise ValueError(f"{event_name} must be a non-empty 1-D array, got shape {e.shape}")
    if t.shape != e.shape:
        raise ValueError(f"{time_name} must be 1-D of one length with {event_name} ({e.size}), got shape {t.shape}")
    if e.dtype != bool:
        if not np.isin(e, [0, 1]).all():
            raise ValueError(f"{event_name} must be bool or 0/1, got values {np.unique(e)[:5]}")
        e = e.astype(bool)
    if not np.isfinite(t).all():
        raise ValueError(f"{time_name} contains NaN or infinite values")
    if need_event and not e.any():
        raise ValueError(f"{event_name} has no events (every subject is censored): the metric is undefined")
    return e, t


def _subject_scores(x: np.ndarray, n: int, name: str, *, ref: str = "event", cols: int | None = None) -> np.ndarray:
    """Validated float scores, (n,) or (n, cols), finite."""
    s = np.asarray(x, dtype=float)
    want = (n,) if cols is None else (n, cols)
    if s.shape != want:
        what = "1-D" if cols is None else f"2-D with {cols} columns (one per time)"
        raise ValueError(f"{name} must be {what} and of one length with {ref} ({n}), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _ipcw_inputs(train_event, train_time, event, time, *, need_event: bool = True):
    """Structured sksurv arrays of the training and test data, plus the test ``(event, time)``."""
    from sksurv.util import Surv

    tr_e, tr_t = _event_time(train_event, train_time, names=("train_event", "train_time"), need_event=False)
    e, t = _event_time(event, time, need_event=need_event)
    return Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(e, t), e, t


def _eval_times(times: np.ndarray, event: np.ndarray, time: np.ndarray, *, need_case: bool) -> np.ndarray:
    """Validated evaluation times: strictly increasing, inside the test follow-up ``[min, max)``."""
    ts = np.asarray(times, dtype=float)
    if ts.ndim == 0:
        ts = ts.reshape(1)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {ts.shape}")
    if not np.isfinite(ts).all():
        raise ValueError("times contains NaN or infinite values")
    if (np.diff(ts) <= 0).any():
        raise ValueError(f"times must be strictly increasing, got {ts}")
    lo, hi = time.min(), time.max()
    outside = (ts < lo) | (ts >= hi)
    if outside.any():
        raise ValueError(
            f"times must lie inside the follow-up range of the test data (time), [{lo:g}, {hi:g}): "
            f"min(time) <= t < max(time), the end excluded as nobody is at risk after it; "
            f"got {ts[outside][:5]} outside"
        )
    if need_case:
        first = time[event].min()
        if ts[0] < first:
            raise ValueError(
                f"times must not precede the first test event ({first:g}): at t={ts[0]:g} there is no case "
                "(event with time <= t), so the AUC is undefined"
            )
    return ts


def _call_ipcw(fn: Callable, *args, train_time: np.ndarray):
    """Call an sksurv IPCW metric, rewording its errors about the censoring-weight range."""
    try:
        return fn(*args)
    except ValueError as err:
        msg = str(err)
        if "largest observed time point" not in msg and "censoring survival function is zero" not in msg:
            raise
        raise ValueError(
            "the inverse-probability-of-censoring weights come from a Kaplan-Meier fit on train_event/train_time, "
            f"defined only up to the training follow-up (largest train_time {np.max(train_time):g}, excluded when "
            "that subject is censored), and the test data reach beyond it. Censor the test follow-up below it "
            "(event &= time < cut; time = min(time, cut)) or choose tau / times below it "
            f"(sksurv said: {msg})"
        ) from err


def uno_c(
    train_event: np.ndarray,
    train_time: np.ndarray,
    event: np.ndarray,
    time: np.ndarray,
    risk: np.ndarray,
    *,
    tau: float | None = None,
) -> float:
    """Uno's c-index: Harrell's pairs weighted by inverse probability of censoring (P4).

    A wrapper over :func:`sksurv.metrics.concordance_index_ipcw`. A pair (i, j) is comparable
    when subject i has an event and ``time[i] < time[j]`` (and ``time[i] < tau``); it counts
    with weight ``1 / G(time[i])**2``, G the Kaplan-Meier estimate of the censoring survival
    function fitted on the *training* data. Unlike Harrell's c (:func:`concordance_index`),
    the estimate does not depend on how heavily the test set is censored, which matters when
    comparing an internal with an external cohort. Without censoring in the training data
    G = 1 and Uno's c equals Harrell's. Ties in ``risk`` count one half.

    Args:
        train_event, train_time: (M,) training outcomes, for the censoring distribution only.
        event, time: (N,) test outcomes, at least one event (before ``tau``).
        risk: (N,) finite risk scores, higher = earlier event.
        tau: truncation time: only pairs whose earlier time is below ``tau`` count. Choose it
            where some training subjects are still followed (P(censoring time > tau) > 0);
            test event times must not exceed the training follow-up unless ``tau`` cuts them
            off. ``None``: no truncation.
    """
    from sksurv.metrics import concordance_index_ipcw

    y_train, y_test, e, t = _ipcw_inputs(train_event, train_time, event, time)
    r = _subject_scores(risk, len(e), "risk")
    if tau is not None:
        tau = float(tau)
        if not np.isfinite(tau):
            raise ValueError(f"tau must be finite or None, got {tau}")
        if not (e & (t < tau)).any():
            raise ValueError(f"event has no events before tau={tau:g} (first event at {t[e].min():g}): undefined")
    return float(_call_ipcw(concordance_index_ipcw, y_train, y_test, r, tau, train_time=y_train["time"])[0])


def time_dependent_auc(
    train_event: np.ndarray,
    train_time: np.ndarray,
    event: np.ndarray,
    time: np.ndarray,
    risk: np.ndarray,
    times: np.ndarray,
) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic AUC(t): how well ``risk`` separates events by t from survivors past t.

    A wrapper over :func:`sksurv.metrics.cumulative_dynamic_auc`: cases are subjects with an
    event at ``time <= t`` (weighted by inverse probability of censoring, estimated on the
    training data), controls those with ``time > t``.

    Args:
        train_event, train_time: (M,) training outcomes, for the censoring distribution only.
        event, time: (N,) test outcomes, at least one event.
        risk: (N,) finite risk scores (higher = earlier event), or (N, T) time-dependent ones.
        times: (T,) strictly increasing evaluation times inside the test follow-up,
            ``min(time) <= t < max(time)``, and not before the first test event.

    Returns:
        ``(auc, mean_auc)``: (T,) AUC at each time, and their mean weighted by the drop of the
        test Kaplan-Meier survival over ``times`` (``auc[0]`` when T = 1).
    """
    from sksurv.metrics import cumulative_dynamic_auc

    y_train, y_test, e, t = _ipcw_inputs(train_event, train_time, event, time)
    ts = _eval_times(times, e, t, need_case=True)
    r = _subject_scores(risk, len(e), "risk", cols=len(ts) if np.ndim(risk) == 2 else None)
    auc, mean_auc = _call_ipcw(cumulative_dynamic_auc, y_train, y_test, r, ts, train_time=y_train["time"])
    return np.asarray(auc, dtype=float), float(mean_auc)


def integrated_brier(
    train_event: np.ndarray,
    train_time: np.ndarray,
    event: np.ndarray,
    time: np.ndarray,
    survival_probs: np.ndarray,
    times: np.ndarray,
) -> float:
    """Integrated Brier score of predicted survival curves (lower is better; 0.25 = constant 0.5).

    A wrapper over :func:`sksurv.metrics.integrated_brier_score`: the IPCW Brier score
    (Graf et al. 1999) at each time, integrated by the trapezoid rule over
    ``[times[0], times[-1]]`` and divided by its length.

    Args:
        train_event, train_time: (M,) training outcomes, for the censoring distribution only.
        event, time: (N,) test outcomes (no event needed).
        survival_probs: (N, T) predicted P(time > times[k]) of each subject, in [0, 1].
        times: (T,) strictly increasing evaluation times, T >= 2, inside the test follow-up
            ``min(time) <= t < max(time)``.
    """
    from sksurv.metrics import integrated_brier_score

    y_train, y_test, e, t = _ipcw_inputs(train_event, train_time, event, time, need_event=False)
    ts = _eval_times(times, e, t, need_case=False)
    if len(ts) < 2:
        raise ValueError(f"times needs at least two time points to integrate over, got {len(ts)}")
    s = _subject_scores(survival_probs, len(e), "survival_probs", cols=len(ts))
    if (s < 0).any() or (s > 1).any():
        raise ValueError("survival_probs must be probabilities in [0, 1]")
    return float(_call_ipcw(integrated_brier_score, y_train, y_test, s, ts, train_time=y_train["time"]))


# --------------------------------------------------------------------------- bootstrap comparison


def _bootstrap_values(
    metric: Callable[..., float], arrays: tuple[np.ndarray, ...], *, n_boot: int, seed: int, desc: str | None
) -> list[float]:
    """Finite values of ``metric`` on ``n_boot`` subject resamples (undefined ones skipped).

    A resample of a small test set may hold one class only. scikit-learn then warns that ROC AUC
    is undefined and returns NaN. That resample is skipped, as documented, so the warning (one
    per resample) is silenced here; on the full arrays it still shows.
    """
    from sklearn.exceptions import UndefinedMetricWarning

    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for _ in core.progress(range(n_boot), desc=desc, disable=desc is None, leave=False):
            idx = rng.integers(0, n, n)
            try:
                v = float(metric(*(a[idx] for a in arrays)))
            except (ValueError, ZeroDivisionError):
                continue
            if np.isfinite(v):
                values.append(v)
    return values


def paired_bootstrap_diff(
    metric: Callable[..., float],
    a_scores: np.ndarray,
    b_scores: np.ndarray,
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    desc: str | None = "paired bootstrap",
) -> dict[str, float]:
    """Difference ``metric(*arrays, a_scores) - metric(*arrays, b_scores)`` of two models scored
    on the same subjects, with a paired bootstrap interval and p-value (P4: fusion vs unimodal).

    Subjects are resampled with replacement, the same indices for the arrays and both models'
    scores, so the interval accounts for the correlation between the two models. Resamples
    on which either metric is undefined (it raises ValueError, or returns NaN, e.g. no event)
    are skipped, as in :func:`bootstrap_ci`.

    The two-sided bootstrap p-value is ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over the
    resampled differences d: the share of resamples on the far side of 0 from the bulk of
    the distribution (differences of exactly 0 count on both sides, so a model compared with
    itself gets p = 1), doubled and capped at 1. Its resolution is ``1 / n_boot``: p = 0 means
    below that, not exactly zero.

    Example: ``paired_bootstrap_diff(concordance_index, fusion_risk, ct_risk, event, time)``.

    Args:
        metric: ``metric(*arrays, scores) -> float``.
        a_scores, b_scores: (N, ...) scores of the two models.
        *arrays: (N, ...) other per-subject arrays, passed first (e.g. event, time).
        n_boot: number of resamples.
        seed: seed of the resampling generator.
        level: coverage of the percentile interval.
        desc: label of the progress bar (``None`` hides it).

    Returns:
        ``{"estimate", "lower", "upper", "p_value", "a", "b", "n_valid"}``: the difference on
        all subjects, its percentile interval, the p-value, each model's metric, and the
        number of resamples used.

    Raises:
        ValueError: mismatched lengths (naming the argument), ``level`` outside (0, 1), the
            metric undefined on the full data, or on more than half of the resamples.
    """
    a = np.asarray(a_scores)
    b = np.asarray(b_scores)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"a_scores must be a non-empty array with one row per subject, got shape {a.shape}")
    n = a.shape[0]
    if b.shape != a.shape:
        raise ValueError(f"b_scores must have the shape of a_scores {a.shape}, got {b.shape}")
    arrays = tuple(np.asarray(x) for x in arrays)
    for i, x in enumerate(arrays):
        if x.ndim == 0 or x.shape[0] != n:
            raise ValueError(f"arrays[{i}] must have one row per subject like a_scores ({n}), got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")

    def diff(*xs: np.ndarray) -> float:
        *rest, sa, sb = xs
        return float(metric(*rest, sa)) - float(metric(*rest, sb))

    est_a, est_b = float(metric(*arrays, a)), float(metric(*arrays, b))
    estimate = est_a - est_b
    if not np.isfinite(estimate):
        raise ValueError(f"the metric is undefined on the full data (a: {est_a}, b: {est_b})")
    values = np.asarray(_bootstrap_values(diff, (*arrays, a, b), n_boot=n_boot, seed=seed, desc=desc))
    return paired_summary(est_a, est_b, values, n_boot=n_boot, level=level)


def paired_summary(est_a: float, est_b: float, values: np.ndarray, *, n_boot: int | None = None,
                   level: float = 0.95) -> dict[str, float]:
    """The result of :func:`paired_bootstrap_diff` from resampled differences already computed
    (e.g. two columns of :func:`concordance_bootstrap`'s samples subtracted). Non-finite values
    (undefined resamples) are dropped; more than half of ``n_boot`` undefined is an error."""
    values = np.asarray(values, dtype=float)
    n_boot = len(values) if n_boot is None else n_boot
    values = values[np.isfinite(values)]
    if len(values) < n_boot / 2:
        raise ValueError(
            f"the metric was undefined on {n_boot - len(values)} of {n_boot} bootstrap resamples (more than half)"
        )
    alpha = (1 - level) / 2
    lower, upper = np.quantile(values, [alpha, 1 - alpha])
    p_value = min(1.0, 2 * min(float(np.mean(values <= 0)), float(np.mean(values >= 0))))
    return {
        "estimate": est_a - est_b,
        "lower": float(lower),
        "upper": float(upper),
        "p_value": p_value,
        "a": est_a,
        "b": est_b,
        "n_valid": len(values),
    }


def concordance_bootstrap(
    event: np.ndarray,
    time: np.ndarray,
    scores: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Harrell's c of several models on the full data and on the same subject resamples, vectorised.

    The resamples are those of :func:`bootstrap_ci` and :func:`paired_bootstrap_diff` with the
    same ``seed`` (``rng.integers(0, N, N)`` per resample), and each value equals
    :func:`concordance_index` on the resampled arrays: scikit-survival's pairs (i an event and
    ``t_j > t_i``, or ``t_j == t_i`` with j censored; a risk tie within 1e-8 counts 1/2). A
    resample is a weight vector w (how often each subject was drawn), and
    ``c = w' A w / w' C w`` with C the comparable pairs and A their concordance. Hundreds of
    resamples of every model then cost a few matrix products instead of a Python loop of
    scikit-survival calls (about 5 ms each): what makes per-model CIs and paired tests of many
    models affordable on a CPU.

    Args:
        event: (N,) bool or 0/1.
        time: (N,) times.
        scores: (N,) or (N, M) risk scores (higher = earlier event), one column per model.
        n_boot: number of resamples.
        seed: seed of the resampling generator.

    Returns:
        ``(estimates (M,), samples (n_boot, M))``; a resample without a comparable pair is NaN
        in every column (skip it, as :func:`bootstrap_ci` does).

    Raises:
        ValueError: as :func:`concordance_index` for bad inputs or no comparable pair.
    """
    e, t = _event_time(event, time)
    s = np.asarray(scores, dtype=float)
    one = s.ndim == 1
    s = s[:, None] if one else s
    if s.ndim != 2 or s.shape[0] != e.size:
        raise ValueError(f"scores must be (N,) or (N, M) with N = {e.size} (the length of event), "
                         f"got {np.shape(scores)}")
    if not np.isfinite(s).all():
        raise ValueError("scores contains NaN or infinite values")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = e.size
    comparable = e[:, None] & ((t[None, :] > t[:, None]) | ((t[None, :] == t[:, None]) & ~e[None, :]))
    if not comparable.any():
        raise ValueError("no comparable pair: the c-index is undefined")
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(float)
    cw = comparable.astype(float)
    denom = np.einsum("bi,ij,bj->b", weights, cw, weights)
    est, samples = np.empty(s.shape[1]), np.empty((n_boot, s.shape[1]))
    for m in range(s.shape[1]):
        diff = s[:, m][:, None] - s[:, m][None, :]
        credit = np.where(np.abs(diff) <= 1e-8, 0.5, (diff > 0).astype(float)) * cw
        est[m] = credit.sum() / cw.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            samples[:, m] = np.einsum("bi,ij,bj->b", weights, credit, weights) / denom
    return est, samples
