"""Figures shared by the pipelines (matplotlib/seaborn); each returns a Figure and never saves it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["loss_curves", "orthogonal_slices", "parameter_schedule", "stacked_shares"]


def epoch_axis(ax: plt.Axes) -> plt.Axes:
    """Whole-number ticks on ``ax``'s x axis: epochs are counted, never 1.5 (returns ``ax``)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax


def loss_curves(history: pd.DataFrame, *, group: str, title: str, ylabel: str, logy: bool = False) -> plt.Figure:
    """Train (solid) and validation (dashed) loss per epoch, one colour per ``group`` value (legend beside the plot)."""
    fig, ax = plt.subplots(figsize=(8.0, 3.8), layout="constrained")
    palette = sns.color_palette("colorblind", history[group].nunique())
    for color, (name, h) in zip(palette, history.groupby(group, sort=False)):
        ax.plot(h["epoch"] + 1, h["train_loss"], color=color, label=f"{name} train")
        if "val_loss" in h and h["val_loss"].notna().any():
            ax.plot(h["epoch"] + 1, h["val_loss"], color=color, ls="--", label=f"{name} val")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    epoch_axis(ax)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the curves
    return fig


def parameter_schedule(schedules: Mapping[str, pd.DataFrame], boundaries: Sequence[int], *, title: str) -> plt.Figure:
    """Cumulative trainable parameters (millions) per epoch as step curves, stages shaded (P2 Figure 3)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    total = max(int(s["epoch"].max()) + 1 for s in schedules.values())
    edges = [0, *boundaries, total]
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        ax.axvspan(a, b, color="0.9" if i % 2 == 0 else "0.97", lw=0)
        ax.text((a + b) / 2, 1.0, f"stage {i + 1}", ha="center", va="bottom", transform=ax.get_xaxis_transform(), fontsize=8)
    for color, (name, s) in zip(sns.color_palette("colorblind", len(schedules)), schedules.items()):
        ax.step(s["epoch"], s["trainable"] / 1e6, where="post", color=color, label=name)
    ax.set(xlabel="epoch", ylabel="trainable parameters (M)", xlim=(0, total))
    epoch_axis(ax)
    ax.set_title(title, pad=16)  # above the stage labels
    ax.legend(frameon=False, fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def stacked_shares(shares: pd.DataFrame, *, title: str, order: Sequence[str]) -> plt.Figure:
    """Horizontal stacked bars: one bar per row of ``shares`` (index = labels), columns = parts in ``order`` (%)."""
    fig, ax = plt.subplots(figsize=(7.2, 0.45 * len(shares) + 1.4))
    left = np.zeros(len(shares))
    for color, col in zip(sns.color_palette("colorblind", len(order)), order):
        vals = shares[col].to_numpy(float)
        ax.barh(range(len(shares)), vals, left=left, color=color, label=col)
        for i, (l, v) in enumerate(zip(left, vals)):
            if v >= 6:
                ax.text(l + v / 2, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
        left += vals
    ax.set_yticks(range(len(shares)), list(shares.index), fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="contribution (%)", title=title)
    ax.legend(frameon=False, fontsize=8, ncol=len(order), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    return fig


def radiological(ax: plt.Axes, *, marks: bool = True) -> plt.Axes:
    """Show a panel whose x axis runs to the subject's right (a RAS grid's first axis, or x in mm)
    in the radiological convention, the one every figure of mmlib uses: the subject's right on the
    viewer's left, as on a chest film or a CT console. ``marks`` writes R and L at the two edges.
    Returns ``ax``."""
    import matplotlib.patheffects as pe

    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    if marks:
        for x, side, ha in ((0.02, "R", "left"), (0.98, "L", "right")):
            ax.text(x, 0.5, side, transform=ax.transAxes, ha=ha, va="center", color="white", fontsize=9,
                    fontweight="bold", path_effects=[pe.withStroke(linewidth=2, foreground="black")])
    return ax


def orthogonal_slices(
    volume: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    point: Sequence[int],
    contour: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    volume_label: str = "image",
) -> plt.Figure:
    """Axial, coronal and sagittal slices through ``point`` (RAS voxel grid): the volume, then each map over it.

    Axial and coronal panels follow the radiological convention (:func:`radiological`); the
    sagittal one is seen from the subject's left, anterior on the left.

    Args:
        volume: (X, Y, Z) image in [0, 1].
        maps: row label -> (X, Y, Z) map drawn over the volume (normalised to its maximum).
        point: voxel (i, j, k) the slices pass through.
        contour: (X, Y, Z) binary mask outlined in every panel (e.g. the planted plaque).
        spacing: voxel size, for the aspect ratio.
        title: figure title.
        volume_label: row label of the plain volume (e.g. ``"CTA"``, ``"FLAIR"``).
    """
    i, j, k = (int(p) for p in point)
    sx, sy, sz = spacing
    views = [  # (name, slicer, aspect): images shown with superior / anterior up
        ("axial (from below)", lambda v: v[:, :, k].T, sy / sx),
        ("coronal (from the front)", lambda v: v[:, j, :].T, sz / sx),
        ("sagittal (from the left)", lambda v: v[i, :, :].T, sz / sy),
    ]
    rows = 1 + len(maps)
    # constrained layout leaves room for the title above the column titles (tight_layout does not)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3.0 * rows), squeeze=False, layout="constrained")
    for c, (name, cut, aspect) in enumerate(views):
        for r in range(rows):
            ax = axes[r, c]
            ax.imshow(cut(volume), cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1)
            if r > 0:
                label, m = list(maps.items())[r - 1]
                top = float(np.max(m)) or 1.0
                ax.imshow(cut(m) / top, cmap="inferno", alpha=0.55, origin="lower", aspect=aspect, vmin=0, vmax=1)
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
            elif c == 0:
                ax.set_ylabel(volume_label, fontsize=8)
            if contour is not None and cut(contour).any():
                ax.contour(cut(contour).astype(float), levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 2:
                ax.invert_xaxis()  # sagittal seen from the left: anterior to the left, in every row
            else:
                radiological(ax, marks=r == 0)  # R / L once, on the image row
    if maps:  # each map is drawn relative to its own maximum: one scale for all of them
        scale = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap="inferno")
        fig.colorbar(scale, ax=axes[1:, :], shrink=0.5, aspect=30, label="map / its maximum")
    fig.suptitle(title, fontsize=10)
    return fig


def km_curves(ax: plt.Axes, groups: Sequence[tuple[str, np.ndarray, np.ndarray, str | None]], *,
              title: str | None = None, xlabel: str = "days",
              ylabel: str | None = "survival probability (95% CI)") -> plt.Axes:
    """Kaplan-Meier curves (scikit-survival) with log-log 95% bands, one per group, on ``ax``.

    Args:
        groups: ``(label, event, time, color)`` per curve; a group without subjects is skipped.
            The legend gives each group's size and number of events.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    for label, event, time, color in groups:
        event, time = np.asarray(event).astype(bool), np.asarray(time, float)
        if event.size == 0:
            continue
        x, s, (lo, hi) = kaplan_meier_estimator(event, time, conf_type="log-log")
        ax.step(np.r_[0, x], np.r_[1, s], where="post", color=color,
                label=f"{label} (n={event.size}, {int(event.sum())} events)")
        ax.fill_between(np.r_[0, x], np.r_[1, lo], np.r_[1, hi], step="post", color=color, alpha=0.15)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return ax
