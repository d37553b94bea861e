"""Metrics as plain functions, each tested against the library that defines it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mmlib import core

__all__ = ["bootstrap_ci", "concordance_index"]


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
