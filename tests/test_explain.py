"""Explanations: modality contribution, occlusion maps (against MONAI) and localisation scores."""

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom
from torch import nn

from mmlib.explain import (
    grid_ceiling,
    localisation_scores,
    modality_contribution,
    occlusion_map,
    patch_grid,
    upsample_layer_map,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


MONAI_INDEXING_WARNING = "ignore:Using a non-tuple sequence:UserWarning"

TAB_GROUPS = {"age": ("tabular", [0]), "gender": ("tabular", [1, 2]), "chd": ("tabular", [3]), "pad": ("tabular", [4])}
GROUPS = {"vision": ("image", None), **TAB_GROUPS}


def _batches(n: int = 2, b: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(b, 1, 8, 8, 8, generator=g) + 2, "tabular": torch.randn(b, 5, generator=g)}
            for _ in range(n)]


# --------------------------------------------------------------------------- modality contribution


def _check_shares(cohort, per_sample, names):
    assert list(cohort.index) == list(names)
    assert cohort.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(per_sample[list(names)].sum(axis=1), 1.0, atol=1e-12)


def test_modality_contribution_tabular_only_model():
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    cohort, per = modality_contribution(lambda b: b["tabular"] @ w, _batches(), GROUPS)
    _check_shares(cohort, per, GROUPS)
    assert cohort["vision"] == 0 and (per["vision"] == 0).all() and (per["d_vision"] == 0).all()
    assert cohort[list(TAB_GROUPS)].sum() == pytest.approx(1.0)
    assert len(per) == 10


def test_modality_contribution_image_only_model():
    cohort, per = modality_contribution(lambda b: b["image"].mean(dim=(1, 2, 3, 4)) * 3, _batches(), GROUPS)
    _check_shares(cohort, per, GROUPS)
    assert cohort["vision"] == 1.0
    assert (cohort[list(TAB_GROUPS)] == 0).all()
    assert (per["vision"] == 1.0).all()


def test_modality_contribution_linear_model_known_shares():
    a, b = 2.0, -0.5
    batches = _batches(n=3, b=4, seed=1)
    cohort, per = modality_contribution(lambda bt: a * bt["tabular"][:, 0] + b * bt["tabular"][:, 1], batches,
                                        {"x0": ("tabular", [0]), "x1": ("tabular", [1]), "x2": ("tabular", [2])})
    x = torch.cat([bt["tabular"] for bt in batches]).double()
    d0, d1 = (a * x[:, 0]).abs(), (b * x[:, 1]).abs()
    assert cohort["x0"] == pytest.approx(float(d0.sum() / (d0.sum() + d1.sum())), rel=1e-6)
    assert cohort["x1"] == pytest.approx(float(d1.sum() / (d0.sum() + d1.sum())), rel=1e-6)
    assert cohort["x2"] == 0
    np.testing.assert_allclose(per["d_x0"], d0.numpy(), rtol=1e-6)
    np.testing.assert_allclose(per["x0"], (d0 / (d0 + d1)).numpy(), rtol=1e-6)


def test_modality_contribution_grouped_columns_occluded_together():
    # f = x1 - x2 + 0.5 x0: occluding {x1, x2} together changes f by |x1 - x2|, not |x1| + |x2| and not |x1|
    def f(bt):
        return bt["tabular"][:, 1] - bt["tabular"][:, 2] + 0.5 * bt["tabular"][:, 0]

    batches = _batches(n=1, b=6, seed=2)
    cohort, per = modality_contribution(f, batches, {"pair": ("tabular", [1, 2]), "x0": ("tabular", [0])})
    x = batches[0]["tabular"].double()
    d_pair, d0 = (x[:, 1] - x[:, 2]).abs(), (0.5 * x[:, 0]).abs()
    np.testing.assert_allclose(per["d_pair"], d_pair.numpy(), rtol=1e-6)
    assert cohort["pair"] == pytest.approx(float(d_pair.sum() / (d_pair.sum() + d0.sum())), rel=1e-6)


def test_modality_contribution_sums_over_outputs_and_uses_baseline():
    # two outputs, baseline 1: occluding x0 changes output 0 by |x0 - 1| and output 1 by 2|x0 - 1|
    def f(bt):
        return torch.stack([bt["tabular"][:, 0], 2 * bt["tabular"][:, 0] + bt["tabular"][:, 1]], dim=1)

    batches = _batches(n=1, b=4, seed=3)
    _, per = modality_contribution(f, batches, {"x0": ("tabular", [0]), "x1": ("tabular", [1])}, baseline=1.0)
    x = batches[0]["tabular"].double()
    np.testing.assert_allclose(per["d_x0"], (3 * (x[:, 0] - 1).abs()).numpy(), rtol=1e-6)
    np.testing.assert_allclose(per["d_x1"], (x[:, 1] - 1).abs().numpy(), rtol=1e-6)


def test_modality_contribution_errors():
    with pytest.raises(KeyError, match="ecg"):
        modality_contribution(lambda b: b["tabular"][:, 0], _batches(), {"ecg": ("ecg", None)})
    with pytest.raises(ValueError):
        modality_contribution(lambda b: b["tabular"][:, 0], _batches(), {})
    with pytest.raises(ValueError, match="no batches"):
        modality_contribution(lambda b: b["tabular"][:, 0], [], GROUPS)


# --------------------------------------------------------------------------- occlusion maps


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Linear(32, 3),
    ).eval()


@pytest.mark.filterwarnings(MONAI_INDEXING_WARNING)
@pytest.mark.parametrize(("shape", "mask", "patches"), [((16, 16, 20), (4, 4, 5), 4 * 4 * 4),
                                                         ((18, 16, 20), (4, 4, 5), 5 * 4 * 4)])
def test_occlusion_map_equals_monai(shape, mask, patches):
    from monai.visualize import OcclusionSensitivity

    net = _net()
    torch.manual_seed(1)
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        theirs, _ = OcclusionSensitivity(net, mask_size=mask, n_batch=8, overlap=0.0, mode=0.0, activate=False,
                                         verbose=False)(x)
    expected = torch.as_tensor(theirs)[0].permute(1, 2, 3, 0).numpy()  # (K, X, Y, Z) -> (X, Y, Z, K)
    ours = occlusion_map(lambda b: net(b["image"]), {"image": x}, mask_size=mask, batch_size=7, desc=None)
    assert ours.voxel_occluded.shape == (*shape, 3)
    np.testing.assert_allclose(ours.voxel_occluded, expected, atol=1e-5, rtol=0)
    assert ours.forward_passes == patches
    assert ours.occluded.shape == (*(len(s) for s in patch_grid(shape, mask)), 3)
    with torch.no_grad():
        ref = net(x)[0].numpy()
    np.testing.assert_allclose(ours.reference, ref, atol=1e-6)
    np.testing.assert_allclose(ours.sensitivity, np.abs(ref - expected).sum(-1), atol=1e-4)


def test_occlusion_map_does_not_depend_on_batch_size():
    net = _net(3)
    x = torch.randn(1, 1, 12, 12, 10)
    maps = [occlusion_map(lambda b: net(b["image"]), {"image": x}, mask_size=(4, 4, 5), batch_size=bs, desc=None)
            for bs in (1, 5, 1000)]
    for m in maps[1:]:
        np.testing.assert_allclose(m.occluded, maps[0].occluded, atol=1e-6)


def test_occlusion_map_of_model_ignoring_image_is_zero():
    x = torch.randn(1, 1, 16, 16, 20)
    tab = torch.randn(1, 5)
    res = occlusion_map(lambda b: b["tabular"].sum(dim=1) * 2, {"image": x, "tabular": tab}, mask_size=(4, 4, 5),
                        desc=None)
    assert res.forward_passes == 64
    assert (res.sensitivity == 0).all()


@pytest.mark.parametrize(
    ("shape", "box", "expected_region"),
    [
        # divisible: patches of 4 x 4 x 5 overlapping the box cover x 4..12, y 4..12, z 5..15
        ((16, 16, 20), (slice(5, 9), slice(6, 10), slice(7, 12)), (slice(4, 12), slice(4, 12), slice(5, 15))),
        # not divisible along x: the last patch starts at 14 and overlaps the one at 12
        ((18, 16, 20), (slice(15, 17), slice(0, 2), slice(19, 20)), (slice(12, 18), slice(0, 4), slice(15, 20))),
    ],
)
def test_occlusion_map_recovers_planted_box(shape, box, expected_region):
    def forward(b):
        return b["image"][:, 0][(slice(None), *box)].mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    x = torch.rand(1, 1, *shape) + 1  # positive: occluding any part of the box lowers the mean
    res = occlusion_map(forward, {"image": x}, mask_size=(4, 4, 5), batch_size=16, desc=None)
    expected = np.zeros(shape, bool)
    expected[expected_region] = True
    assert ((res.sensitivity > 0) == expected).all()


def test_occlusion_map_repeats_other_inputs_and_matches_manual_loop():
    def forward(b):
        return b["image"][:, 0, :4, :4].sum(dim=(1, 2, 3)) * b["tabular"].sum(dim=1)

    torch.manual_seed(0)
    x, tab = torch.randn(1, 1, 8, 8, 6), torch.randn(1, 5)
    res = occlusion_map(forward, {"image": x, "tabular": tab}, mask_size=(4, 4, 3), baseline=0.5, batch_size=3,
                        desc=None)
    for i, sx in enumerate(res.starts[0]):
        for j, sy in enumerate(res.starts[1]):
            for k, sz in enumerate(res.starts[2]):
                occ = x.clone()
                occ[..., sx:sx + 4, sy:sy + 4, sz:sz + 3] = 0.5
                want = forward({"image": occ, "tabular": tab}).item()
                assert res.occluded[i, j, k, 0] == pytest.approx(want, abs=1e-5)


def test_occlusion_map_input_checks():
    x = torch.randn(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        occlusion_map(lambda b: b["image"].mean(), {"image": x}, mask_size=(4, 4, 4), desc=None)
    with pytest.raises(ValueError, match="mask size"):
        occlusion_map(lambda b: b["image"].mean(), {"image": x[:1]}, mask_size=(4, 4, 9), desc=None)
    assert [list(s) for s in patch_grid((10, 8, 8), (4, 4, 8))] == [[0, 4, 6], [0, 4], [0]]


# --------------------------------------------------------------------------- localisation scores


def _mask(shape=(16, 16, 16)):
    m = np.zeros(shape, bool)
    m[4:8, 6:10, 2:6] = True
    return m


def test_localisation_perfect_map():
    m = _mask()
    s = localisation_scores(m.astype(float), m, n_random=100)
    assert s["mass_inside"] == 1.0
    assert s["pointing_game"] is True
    assert s["region_fraction"] == pytest.approx(m.mean())
    assert s["rank_percentile"] == 100.0  # the region holds the top cell


def test_localisation_single_peak_inside_is_top_ranked():
    m = _mask()
    a = np.full(m.shape, 0.1)
    a[5, 7, 3] = 1.0  # unique maximum, inside the region
    s = localisation_scores(a, m, n_random=100)
    assert s["pointing_game"] is True
    assert s["rank_percentile"] == 100.0
    a[0, 0, 0] = 2.0  # now the maximum lies outside; the region's best is second of 4096 cells
    s = localisation_scores(a, m, n_random=100)
    assert s["pointing_game"] is False
    assert s["rank_percentile"] < 100.0


def test_localisation_uniform_map_scores_chance():
    m = _mask()
    s = localisation_scores(np.ones(m.shape), m, n_random=50)
    assert s["mass_inside"] == pytest.approx(m.mean())
    assert s["mass_inside"] == pytest.approx(s["region_fraction"])
    assert s["chance_mean"] == pytest.approx(m.mean())
    assert s["ratio"] == pytest.approx(1.0)


def test_localisation_random_map_chance_level():
    m = _mask()
    a = np.random.default_rng(0).random(m.shape)
    s = localisation_scores(a, m, n_random=300, seed=1)
    assert s["chance_mean"] == pytest.approx(s["region_fraction"], abs=0.003)
    assert s["chance_p95"] > s["chance_mean"]
    # a map concentrated in the region beats chance by about 1 / region_fraction
    s = localisation_scores(a * m + 1e-9, m, n_random=50)
    assert s["mass_inside"] > 0.99 and s["ratio"] > 0.9 / m.mean()


def test_localisation_chance_follows_the_hypergeometric_law_of_a_shuffled_map():
    """A map of value 1 on q cells and 0 elsewhere, shuffled: the share on a region of k of n cells is
    (how many of the q cells land in it) / q, a hypergeometric count. The shuffles' mean and 95th
    percentile must follow that law."""
    m = _mask()
    n, k, q = m.size, int(m.sum()), 400
    a = np.zeros(n)
    a[np.random.default_rng(3).choice(n, q, replace=False)] = 1.0
    s = localisation_scores(a.reshape(m.shape), m, n_random=4000, seed=2)
    law = hypergeom(n, q, k)
    assert s["chance_mean"] == pytest.approx(law.mean() / q, abs=3 * law.std() / q / np.sqrt(4000))
    assert law.ppf(0.93) / q <= s["chance_p95"] <= law.ppf(0.97) / q


def test_localisation_input_errors():
    m = _mask()
    a = np.ones(m.shape)
    a[0, 0, 0] = -1e-3
    with pytest.raises(ValueError, match="non-negative"):
        localisation_scores(a, m)
    with pytest.raises(ValueError, match="empty"):
        localisation_scores(np.ones(m.shape), np.zeros(m.shape, bool))
    with pytest.raises(ValueError, match="shape"):
        localisation_scores(np.ones((4, 4, 4)), m)


def test_localisation_patch_region_is_patches_touching_mask():
    shape = (16, 16, 16)
    m = np.zeros(shape, bool)
    m[5, 5, 5] = True  # one voxel: touches only the patch starting at (4, 4, 4)
    s = localisation_scores(np.ones(shape), m, patch=(4, 4, 4), n_random=20)
    assert s["region_fraction"] == pytest.approx(1 / 64)
    m[3, 5, 5] = True  # and a voxel of the neighbouring patch (0, 4, 4)
    s = localisation_scores(np.ones(shape), m, patch=(4, 4, 4), n_random=20)
    assert s["region_fraction"] == pytest.approx(2 / 64)
    # a map on the patch at (4, 4, 4) but not on the mask voxel: all inside at patch resolution only
    a = np.zeros(shape)
    a[4:8, 4:8, 4:8] = 1.0
    a[5, 5, 5] = 0.0
    m = np.zeros(shape, bool)
    m[5, 5, 5] = True
    assert localisation_scores(a, m, patch=(4, 4, 4), n_random=20)["mass_inside"] == 1.0
    assert localisation_scores(a, m, n_random=20)["mass_inside"] == 0.0


# ----------------------------------------------------------------------------- the ceiling of a coarse grid


def _expected_ratio(amap: np.ndarray, mask: np.ndarray) -> float:
    """localisation_scores' ratio with the shuffled maps' exact mean (mass share inside / truth share)."""
    return float(amap[mask].sum() / amap.sum() / mask.mean())


def test_grid_ceiling_is_the_best_one_cell_map_and_no_map_on_the_grid_beats_it():
    size = (20, 24, 16)
    mask = np.zeros(size, bool)
    mask[2:5, 15:19, 9:12] = True
    mask[14, 3, 4] = True
    rng = np.random.default_rng(0)
    for grid in [(2, 2, 2), (3, 3, 2), (5, 6, 4)]:
        c = grid_ceiling(grid, mask)
        one = np.zeros(grid, np.float32)
        one[c["best_cell"]] = 1.0
        best = upsample_layer_map(one, size).astype(np.float64)
        assert c["ceiling_ratio"] == pytest.approx(_expected_ratio(best, mask), rel=1e-6)  # attained
        for _ in range(30):  # and never exceeded: random maps, and each other single cell
            amap = upsample_layer_map(rng.random(grid).astype(np.float32) ** 4, size).astype(np.float64)
            assert _expected_ratio(amap, mask) <= c["ceiling_ratio"] * (1 + 1e-6)
        for cell in np.ndindex(*grid):
            other = np.zeros(grid, np.float32)
            other[cell] = 1.0
            assert _expected_ratio(upsample_layer_map(other, size).astype(np.float64), mask) <= c["ceiling_ratio"] * (1 + 1e-6)
    # the finer the grid, the higher the ceiling; on the input grid itself it is 1 / (truth share)
    ceilings = [grid_ceiling(g, mask)["ceiling_ratio"] for g in [(2, 2, 2), (5, 6, 4), (10, 12, 8)]]
    assert ceilings == sorted(ceilings) and ceilings[0] > 1
    assert grid_ceiling(size, mask)["ceiling_ratio"] == pytest.approx(1 / mask.mean())
    # a map that puts its mass on that ceiling scores it under localisation_scores too (shuffles average it)
    sc = localisation_scores(best, mask, n_random=2000, seed=1)
    assert sc["ratio"] == pytest.approx(grid_ceiling((5, 6, 4), mask)["ceiling_ratio"], rel=0.1)


def test_grid_ceiling_input_errors():
    with pytest.raises(ValueError, match="empty"):
        grid_ceiling((2, 2, 2), np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="does not match"):
        grid_ceiling((2, 2), np.ones((8, 8, 8), bool))
