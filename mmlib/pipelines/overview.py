"""The overview notebook's stages: a precision check of this device and a first look at real
survival data (the Veterans' lung cancer trial that scikit-survival ships).

The survival stage previews what the P4 pipeline reports at scale: Kaplan-Meier curves, a
log-rank test, and Harrell's c-index with a bootstrap confidence interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mmlib import core, metrics

__all__ = ["PROFILES", "OverviewProfile", "precision_check", "veterans_survival"]


@dataclass(frozen=True)
class OverviewProfile(core.Profile):
    """Sizes of the overview notebook.

    Attributes:
        n_bootstrap: bootstrap resamples for the c-index confidence intervals.
        volume_size: edge of the random 3D volume used by the precision check.
    """

    n_bootstrap: int = 1000
    volume_size: int = 32


PROFILES = core.ProfileSet(
    smoke=OverviewProfile(name="smoke", n_bootstrap=50, volume_size=16),
    quick=OverviewProfile(name="quick", n_bootstrap=1000, volume_size=32),
    full=OverviewProfile(name="full", n_bootstrap=5000, volume_size=64),
)


def precision_check(device: torch.device, *, seed: int, volume_size: int = 32) -> pd.DataFrame:
    """Relative error of bf16 autocast against fp32 for the layers the pipelines use.

    Runs a seeded 3D convolution (an image encoder's first layer) and a linear layer (a
    tabular/projection layer) in fp32 and under bf16 autocast on ``device``.

    Returns:
        One row per layer: ``layer``, ``input shape``, ``max relative error`` and
        ``mean relative error`` of the bf16 output, relative to the largest fp32 magnitude.
    """
    gen = torch.Generator().manual_seed(seed)
    s = volume_size
    cases = {
        "Conv3d(1->32, k7, s2)": (torch.nn.Conv3d(1, 32, 7, stride=2, padding=3), (2, 1, s, s, s)),
        "Linear(2048->128)": (torch.nn.Linear(2048, 128), (64, 2048)),
    }
    rows = []
    for label, (layer, shape) in cases.items():
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            x = torch.randn(shape, generator=gen)
            layer, xd = layer.to(device), x.to(device)
            ref = layer(xd).float()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                low = layer(xd).float()
        err = (low - ref).abs() / ref.abs().max()
        rows.append({
            "layer": label,
            "input shape": "x".join(map(str, shape)),
            "max relative error": err.max().item(),
            "mean relative error": err.mean().item(),
        })
    return pd.DataFrame(rows)


def _km_summary(event: np.ndarray, time: np.ndarray, horizons: tuple[int, ...]) -> dict[str, float]:
    from sksurv.nonparametric import kaplan_meier_estimator

    t, s = kaplan_meier_estimator(event, time)
    below = np.nonzero(s <= 0.5)[0]
    out = {"n": len(time), "events": int(event.sum()), "median survival (days)": float(t[below[0]]) if len(below) else np.nan}
    for h in horizons:
        idx = np.searchsorted(t, h, side="right") - 1
        out[f"S({h} d)"] = float(s[idx]) if idx >= 0 else 1.0
    return out


def veterans_survival(*, n_bootstrap: int, seed: int) -> dict[str, object]:
    """Kaplan-Meier, log-rank and c-index on the Veterans' Administration lung cancer trial.

    137 patients randomised to standard or test chemotherapy (Kalbfleisch & Prentice, 1980),
    loaded from the copy scikit-survival ships (no download).

    Returns:
        A dict with tables ``km`` (one row per group), ``logrank`` and ``cindex``
        (c-index with a bootstrap CI for single baseline covariates) and a matplotlib
        figure ``figure`` (Kaplan-Meier curves with 95% confidence bands).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from sksurv.compare import compare_survival
    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.nonparametric import kaplan_meier_estimator

    X, y = load_veterans_lung_cancer()
    event, time = y["Status"], y["Survival_in_days"]
    groupings = {
        "treatment": X["Treatment"].astype(str).to_numpy(),
        "Karnofsky score": np.where(X["Karnofsky_score"] >= 50, ">= 50", "< 50"),
    }
    horizons = (90, 180, 365)
    km_rows, lr_rows = [], []
    for grouping, labels in groupings.items():
        for g in sorted(np.unique(labels)):
            m = labels == g
            km_rows.append({"grouping": grouping, "group": g, **_km_summary(event[m], time[m], horizons)})
        chisq, p = compare_survival(y, labels)
        lr_rows.append({"grouping": grouping, "log-rank chi2": chisq, "p-value": p})

    ci_rows = []
    for covariate, risk in (
        ("Karnofsky score (lower = higher risk)", -X["Karnofsky_score"].to_numpy()),
        ("age", X["Age_in_years"].to_numpy()),
        ("months from diagnosis", X["Months_from_Diagnosis"].to_numpy()),
    ):
        est, lo, hi = metrics.bootstrap_ci(metrics.concordance_index, event, time, risk, n_boot=n_bootstrap, seed=seed)
        ci_rows.append({"risk score": covariate, "c-index": est, "95% CI low": lo, "95% CI high": hi, "bootstrap resamples": n_bootstrap})

    sns.set_theme(context="paper", style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
    palette = sns.color_palette("colorblind")
    for ax, (grouping, labels) in zip(axes, groupings.items()):
        for k, g in enumerate(sorted(np.unique(labels))):
            m = labels == g
            t, s, conf = kaplan_meier_estimator(event[m], time[m], conf_type="log-log")
            # Curves start at S(0) = 1.
            t, s = np.r_[0.0, t], np.r_[1.0, s]
            conf = np.c_[np.ones((2, 1)), conf]
            ax.step(t, s, where="post", color=palette[k], label=f"{g} (n={m.sum()})")
            ax.fill_between(t, conf[0], conf[1], step="post", color=palette[k], alpha=0.2, linewidth=0)
        p = next(r["p-value"] for r in lr_rows if r["grouping"] == grouping)
        ax.set_title(f"by {grouping} (log-rank p = {p:.2g})")
        ax.set_xlabel("days since randomisation")
        ax.legend(frameon=False)
    axes[0].set_ylabel("survival probability")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle("Veterans' lung cancer trial: Kaplan-Meier estimates with 95% CI")
    fig.tight_layout()
    return {"km": pd.DataFrame(km_rows), "logrank": pd.DataFrame(lr_rows), "cindex": pd.DataFrame(ci_rows), "figure": fig}
