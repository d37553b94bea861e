"""Figures: what a reader sees must match the data (orientation) and be legible (no overlapping text)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mmlib import viz


@pytest.fixture()
def slices_figure():
    vol = np.zeros((40, 48, 40))  # P1's quick grid, with as many maps as its Grad-CAM figure
    vol[:, 30:, :] = 1.0  # the anterior part (high j) is bright
    maps = {f"method {m} · map {k}": np.roll(vol, k, axis=0) for m in range(2) for k in range(4)}
    fig = viz.orthogonal_slices(vol, maps, point=(20, 24, 20), spacing=(4, 4, 4), title="Stroke-class maps "
                                "(Grad-CAM at ResNet layer4; occlusion mask [4, 4, 4]), sub-0041", volume_label="FLAIR")
    yield fig
    plt.close(fig)


def test_every_sagittal_panel_shows_anterior_on_the_same_side(slices_figure):
    axes = np.array(slices_figure.axes).reshape(-1, 3)
    assert len(axes) == 9
    for row in axes:
        sagittal = row[2]
        # seen from the left: anterior (high j, the bright half) on the left, in the volume's row and each map's
        assert sagittal.xaxis_inverted(), sagittal.get_ylabel()
        assert not row[0].xaxis_inverted() and not row[1].xaxis_inverted()


def test_the_title_sits_above_the_column_titles(slices_figure):
    fig = slices_figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes[:3]:
        column = ax.title.get_window_extent(renderer)
        assert title.y0 >= column.y1 - 0.5, (ax.get_title(), title, column)  # display y grows upwards
