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
    axes = np.array([ax for ax in slices_figure.axes if ax.get_label() != "<colorbar>"]).reshape(-1, 3)
    assert len(axes) == 9
    for row in axes:
        sagittal = row[2]
        # seen from the left: anterior (high j, the bright half) on the left, in the volume's row and each map's
        assert sagittal.xaxis_inverted(), sagittal.get_ylabel()


def test_axial_and_coronal_panels_are_radiological_in_every_row(slices_figure):
    axes = np.array([ax for ax in slices_figure.axes if ax.get_label() != "<colorbar>"]).reshape(-1, 3)
    for r, row in enumerate(axes):
        for ax in row[:2]:
            # RAS: high i is the subject's right, drawn on the viewer's left
            assert ax.xaxis_inverted(), (r, ax.get_title())
            marks = {t.get_text(): t.get_position()[0] for t in ax.texts}
            assert marks == ({"R": 0.02, "L": 0.98} if r == 0 else {}), (r, marks)


def test_radiological_puts_the_subjects_right_on_the_viewers_left():
    fig, ax = plt.subplots()
    img = np.zeros((8, 10))
    img[:, 7:] = 1.0  # RAS columns: the subject's right (high x) is bright
    ax.imshow(img, origin="lower")
    assert viz.radiological(ax) is ax and viz.radiological(ax, marks=False) is ax  # idempotent: still inverted
    fig.canvas.draw()
    x_bright = ax.transData.transform((8.0, 4.0))[0]
    x_dark = ax.transData.transform((2.0, 4.0))[0]
    assert x_bright < x_dark
    assert [t.get_text() for t in ax.texts] == ["R", "L"]
    plt.close(fig)


def test_the_title_sits_above_the_column_titles(slices_figure):
    fig = slices_figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes[:3]:
        column = ax.title.get_window_extent(renderer)
        assert title.y0 >= column.y1 - 0.5, (ax.get_title(), title, column)  # display y grows upwards


def test_the_maps_carry_one_colour_bar_that_says_each_is_scaled_to_its_maximum(slices_figure):
    bars = [ax for ax in slices_figure.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "map / its maximum"


def _extent(artist, fig):
    fig.canvas.draw()
    return artist.get_window_extent(fig.canvas.get_renderer())


def test_the_loss_legend_sits_beside_the_curves_not_on_them():
    import pandas as pd

    h = pd.DataFrame({"objective": np.repeat([f"objective {k}" for k in range(5)], 10), "epoch": np.tile(range(10), 5),
                      "train_loss": np.linspace(3, 1, 50), "val_loss": np.linspace(3.1, 1.2, 50)})
    fig = viz.loss_curves(h, group="objective", title="Pretraining loss", ylabel="loss")
    ax = fig.axes[0]
    assert _extent(ax.get_legend(), fig).x0 >= _extent(ax.patch, fig).x1  # right of the data area
    assert _extent(ax.get_legend(), fig).x1 <= fig.bbox.x1 + 0.5  # and not cut off
    plt.close(fig)


def test_a_short_run_counts_whole_epochs():
    import pandas as pd

    h = pd.DataFrame({"objective": ["a"] * 3, "epoch": range(3), "train_loss": [3.0, 2.0, 1.5]})
    fig = viz.loss_curves(h, group="objective", title="Three epochs", ylabel="loss")
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def test_the_schedule_title_sits_above_the_stage_labels():
    import pandas as pd

    s = {name: pd.DataFrame({"epoch": range(25), "trainable": np.minimum(np.arange(25) // 5 + 1, 4) * 1e6})
         for name in ("from scratch", "pretrained progressive")}
    fig = viz.parameter_schedule(s, [5, 10, 15], title="Progressive unfreezing (25 epochs)")
    ax = fig.axes[0]
    stages = [t for t in ax.texts if t.get_text().startswith("stage")]
    assert len(stages) == 4
    assert _extent(ax.title, fig).y0 >= max(_extent(t, fig).y1 for t in stages) - 0.5
    plt.close(fig)
