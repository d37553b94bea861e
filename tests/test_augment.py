"""P1 views: per-sample 3D image augmentation and SCARF tabular corruption (mmlib.augment)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from mmlib.augment import ImageAugment3d, TabularCorruption, affine_grid_3d

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# each step alone: everything else switched off
NO_SPATIAL = dict(crop_scale=(1.0, 1.0), rotate_deg=0.0, scale_range=(1.0, 1.0))
FLIP_ONLY = dict(rate=1.0, gamma_range=(1.0, 1.0), **NO_SPATIAL)
GAMMA_ONLY = dict(rate=1.0, flip_axes=(), **NO_SPATIAL)
CROP_ONLY = dict(rate=1.0, rotate_deg=0.0, scale_range=(1.0, 1.0), flip_axes=(), gamma_range=(1.0, 1.0))
AFFINE_ONLY = dict(rate=1.0, crop_scale=(1.0, 1.0), flip_axes=(), gamma_range=(1.0, 1.0))


def _volumes(b: int = 4, shape=(8, 10, 12), c: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, *shape, generator=g) * 3.0 + 2.0  # intensities in [2, 5]


def _ramp(b: int, shape, coef) -> torch.Tensor:
    """f(i, j, k) = coef . (i, j, k) in voxel indices, for b samples (trilinear reproduces it exactly)."""
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    f = coef[0] * i + coef[1] * j + coef[2] * k
    return f.expand(b, 1, *shape).contiguous()


# ----------------------------------------------------------------------------------- image


def test_image_augment_copies_and_keeps_shape_dtype():
    aug = ImageAugment3d(rate=1.0)
    for dtype in (torch.float32, torch.float64):
        x = _volumes().to(dtype)
        keep = x.clone()
        out, applied = aug(x, 0, return_applied=True)
        assert torch.equal(x, keep)  # input untouched
        assert out.shape == x.shape and out.dtype == dtype and type(out) is torch.Tensor
        assert applied.dtype == torch.bool and applied.shape == (len(x),) and applied.all()
        assert out.data_ptr() != x.data_ptr()
        for i in range(len(x)):
            assert not torch.equal(out[i], x[i])
    # two channels are resampled with the same geometry: a duplicated channel stays duplicated
    x2 = _volumes(3).expand(-1, 2, -1, -1, -1).contiguous()
    out2 = aug(x2, 1)
    assert torch.equal(out2[:, 0], out2[:, 1])


def test_image_augment_is_seeded():
    aug = ImageAugment3d()
    x = _volumes(6)
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    assert torch.equal(a, aug(x, 5))  # an int seed is the same as a generator seeded with it
    assert not torch.equal(a, aug(x, 6))
    g = torch.Generator().manual_seed(5)
    first, second = aug(x, g), aug(x, g)  # a shared generator advances: fresh draws each batch
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_rate_is_drawn_per_sample_and_unaugmented_samples_are_exact():
    x = _volumes(2000, shape=(4, 4, 4))
    out, applied = ImageAugment3d(rate=0.95)(x, 0, return_applied=True)
    assert abs(applied.float().mean().item() - 0.95) < 0.02
    assert 0 < (~applied).sum() < 2000
    same = (out == x).flatten(1).all(1)
    assert torch.equal(same, ~applied)  # exactly the non-augmented samples come back unchanged

    # the public code's bug draws once per pipeline (all or none per batch); here batches of 64 mix
    mixed = 0
    for seed in range(30):
        _, applied = ImageAugment3d()(x[:64], seed, return_applied=True)
        mixed += int(0 < applied.sum() < 64)
    assert mixed >= 25  # P(all 64 augmented) = 0.95**64 = 4%
    _, applied = ImageAugment3d(rate=0.5)(x[:64], 0, return_applied=True)
    assert 16 < applied.sum() < 48

    # parameters are drawn per sample too: one volume repeated gives different views
    rep = x[:1].expand(8, -1, -1, -1, -1).contiguous()
    out = ImageAugment3d(rate=1.0)(rep, 0)
    assert len({tuple(v.flatten().tolist()) for v in out}) == 8

    assert torch.equal(ImageAugment3d(rate=0.0)(x[:64], 0), x[:64])
    assert ImageAugment3d(rate=1.0)(x[:64], 0, return_applied=True)[1].all()


def test_flips_are_exact_and_only_along_the_chosen_axes():
    x = _volumes(16)
    # always flipped along X: exactly torch.flip over the X dimension
    assert torch.equal(ImageAugment3d(flip_prob=1.0, **FLIP_ONLY)(x, 0), x.flip(2))
    assert torch.equal(ImageAugment3d(flip_axes=(1, 2), flip_prob=1.0, **FLIP_ONLY)(x, 0), x.flip(3).flip(4))
    # default: X (left-right) only, p = 0.5 per sample -> each sample is x or x flipped along X, both occur
    out = ImageAugment3d(**FLIP_ONLY)(x, 0)
    flipped = [torch.equal(out[i], x[i].flip(1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    # every axis: each sample is one of the 8 flip combinations, and several combinations occur
    out = ImageAugment3d(flip_axes=(0, 1, 2), **FLIP_ONLY)(x, 1)
    seen = set()
    for i in range(len(x)):
        hits = [dims for r in range(4) for dims in itertools.combinations((1, 2, 3), r)
                if torch.equal(out[i], x[i].flip(dims) if dims else x[i])]
        assert len(hits) == 1, i
        seen.add(hits[0])
    assert len(seen) >= 4


def test_crop_reads_a_window_inside_the_volume_along_the_right_axes():
    shape = (8, 10, 12)  # non-cubic, so a mix-up of the axis order shows
    aug = ImageAugment3d(crop_scale=(0.5, 1.0), **CROP_ONLY)
    slopes = []
    for axis in range(3):
        coef = [0.0, 0.0, 0.0]
        coef[axis] = 1.0
        f = _ramp(16, shape, coef)
        out = aug(f, 3)
        d = out.diff(dim=2 + axis)
        # the ramp stays along its own axis, with a constant slope = the crop fraction of that side
        for other in {0, 1, 2} - {axis}:
            assert out.diff(dim=2 + other).abs().max() < 1e-9
        per_sample = d.flatten(1)
        assert (per_sample.max(1).values - per_sample.min(1).values).max() < 1e-9
        s = per_sample[:, 0]
        assert (s >= 0.5 - 1e-9).all() and (s <= 1.0 + 1e-9).all() and s.std() > 0.05
        slopes.append(s)
        # the window lies inside the volume: no padding is read, values stay in the input range
        assert out.min() >= -1e-9 and out.max() <= shape[axis] - 1 + 1e-9
        assert out.amin(dim=(1, 2, 3, 4)).std() > 0.1  # window positions vary
    # each side draws its own fraction
    assert not torch.allclose(slopes[0], slopes[1])
    # a fixed fraction 0.5: the output spans half of each side
    f = _ramp(4, shape, (1.0, 1.0, 1.0))
    out = ImageAugment3d(crop_scale=(0.5, 0.5), **CROP_ONLY)(f, 0)
    for axis in range(3):
        assert torch.allclose(out.diff(dim=2 + axis), torch.full((), 0.5, dtype=torch.float64))


def test_rotation_is_rigid_in_voxel_units_and_about_the_centre():
    shape = (15, 21, 27)  # odd sizes: a centre voxel; non-cubic: rotating normalised coords would shear
    centre = tuple(n // 2 for n in shape)
    f = _ramp(16, shape, (1.0, 0.0, 0.0))
    out = ImageAugment3d(rotate_deg=10.0, scale_range=(1.0, 1.0), **{k: v for k, v in AFFINE_ONLY.items()
                                                                      if k != "scale_range"})(f, 0)
    core = (slice(None), 0, slice(5, 10), slice(8, 13), slice(11, 16))
    angles = []
    for i in range(len(f)):
        grad = torch.stack([out.diff(dim=2 + a)[core][i].mean() for a in range(3)])
        assert abs(grad.norm().item() - 1.0) < 1e-6  # a rotation keeps the gradient's length
        angles.append(math.degrees(math.acos(min(1.0, abs(grad[0].item())))))
        assert abs(out[i, 0][centre].item() - f[i, 0][centre].item()) < 1e-9  # centre is fixed
    assert max(angles) <= 20.0 + 1e-6  # two of the three Euler angles tilt the X axis, each <= 10 deg
    assert max(angles) > 3.0


def test_zoom_scales_about_the_centre():
    shape = (9, 11, 13)
    f = _ramp(16, shape, (1.0, 1.0, 1.0))
    out = ImageAugment3d(rotate_deg=0.0, scale_range=(0.9, 1.1),
                         **{k: v for k, v in AFFINE_ONLY.items() if k != "scale_range"})(f, 0)
    core = (slice(None), 0, slice(3, 6), slice(4, 7), slice(5, 8))
    for a in range(3):
        slope = out.diff(dim=2 + a)[core].flatten(1)
        assert (slope.max(1).values - slope.min(1).values).max() < 1e-9
        s = slope[:, 0]
        assert (s >= 1 / 1.1 - 1e-9).all() and (s <= 1 / 0.9 + 1e-9).all() and s.std() > 0.02
    assert torch.allclose(out[:, 0, 4, 5, 6], f[:, 0, 4, 5, 6])


def test_gamma_keeps_min_max_and_order_per_sample():
    x = _volumes(12, c=2)
    out = ImageAugment3d(**GAMMA_ONLY)(x, 0)
    lo, hi = x.amin(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4))
    assert torch.equal(out.amin(dim=(1, 2, 3, 4)), lo) and torch.equal(out.amax(dim=(1, 2, 3, 4)), hi)
    gammas = []
    for i in range(len(x)):
        order = x[i].flatten().argsort()
        assert (out[i].flatten()[order].diff() >= 0).all()  # monotone map of intensities
        t = (x[i] - lo[i]) / (hi[i] - lo[i])
        u = (out[i] - lo[i]) / (hi[i] - lo[i])
        mid = (t > 0.2) & (t < 0.8)
        g = (u[mid].double().log() / t[mid].double().log())
        assert g.std() < 1e-3  # one exponent per sample, shared by its channels
        gammas.append(g.mean().item())
    assert min(gammas) >= 0.7 - 1e-3 and max(gammas) <= 1.5 + 1e-3
    assert np.std(gammas) > 0.1  # drawn per sample
    # a constant volume has no range to normalise: left alone
    const = torch.full((2, 1, 4, 4, 4), 3.0)
    assert torch.equal(ImageAugment3d(**GAMMA_ONLY)(const, 0), const)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial", [(5, 7, 9), (9, 1, 4), (1, 1, 6), (3, 2, 1)])
def test_affine_grid_3d_is_torchs_affine_grid(dtype, spatial):
    """The separable grid is affine_grid's (align_corners=True) for any matrix, on non-cubic grids
    and singleton axes: axes swapped or a coordinate misplaced breaks it by far more than rounding."""
    theta = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(sum(spatial)), dtype=dtype)
    size = [4, 2, *spatial]
    ours = affine_grid_3d(theta, size)
    assert ours.shape == (4, *spatial, 3) and ours.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(ours, F.affine_grid(theta, size, align_corners=True), rtol=0, atol=tol)


def test_affine_grid_3d_rejects_bad_shapes():
    with pytest.raises(ValueError, match="theta"):
        affine_grid_3d(torch.zeros(2, 2, 3), [2, 1, 4, 4, 4])
    with pytest.raises(ValueError, match="size"):
        affine_grid_3d(torch.zeros(2, 3, 4), [3, 1, 4, 4, 4])
    with pytest.raises(ValueError, match="size"):
        affine_grid_3d(torch.zeros(2, 3, 4), [2, 1, 4, 4])


def test_full_augmentation_of_a_large_batch_is_finite():
    # its speed is measured by benchmarks/bench_augment.py, not asserted here
    out = ImageAugment3d(rate=1.0)(torch.rand(6, 1, 64, 64, 64), 0)
    assert out.shape == (6, 1, 64, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(rate=1.5), "rate"),
        (dict(flip_prob=-0.1), "flip_prob"),
        (dict(flip_axes=(3,)), "flip_axes"),
        (dict(flip_axes=(0, 0)), "flip_axes"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(crop_scale=(0.8, 1.2)), "crop_scale"),
        (dict(crop_scale=(0.9, 0.8)), "crop_scale"),
        (dict(scale_range=(0.0, 1.1)), "scale_range"),
        (dict(gamma_range=(1.5, 0.7)), "gamma_range"),
        (dict(rotate_deg=-1.0), "rotate_deg"),
        (dict(padding_mode="wrap"), "padding_mode"),
        (dict(mode="cubic"), "mode"),
    ],
)
def test_image_augment_rejects_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ImageAugment3d(**kwargs)


def test_image_augment_rejects_bad_inputs():
    aug = ImageAugment3d()
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        aug(torch.rand(1, 8, 8, 8), 0)
    with pytest.raises(ValueError, match="floating point"):
        aug(torch.ones(1, 1, 4, 4, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="generator"):
        aug(torch.rand(1, 1, 4, 4, 4), 0.5)


# ----------------------------------------------------------------------------------- tabular

CAT_CODES = np.array([0, 1, 2, 3, -1])
CAT_PROBS = np.array([0.5, 0.2, 0.15, 0.05, 0.1])


def _table(n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 categorical fields (the third a copy of the first) and 3 continuous (the second a
    function of the first), with missing values."""
    rng = np.random.default_rng(seed)
    c0 = rng.choice(CAT_CODES, size=n, p=CAT_PROBS)
    c1 = rng.choice([10, 11, 12], size=n, p=[0.7, 0.2, 0.1])
    cat = torch.from_numpy(np.stack([c0, c1, c0], axis=1)).long()
    x0 = rng.exponential(2.0, size=n)
    x0[rng.random(n) < 0.1] = np.nan
    cont = torch.from_numpy(np.stack([x0, 2 * x0 + 1, rng.normal(50, 5, size=n)], axis=1)).float()
    return cat, cont


@pytest.fixture(scope="module")
def table():
    return _table()


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise equality treating NaN == NaN."""
    return (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b


def test_corruption_copies_replaces_30_percent_and_keeps_the_rest(table):
    cat, cont = table
    keep_cat, keep_cont = cat.clone(), cont.clone()
    corrupt = TabularCorruption().fit(cat, cont)
    cat2, cont2, mcat, mcont = corrupt(cat, cont, 0, return_mask=True)
    assert torch.equal(cat, keep_cat) and torch.equal(cont.nan_to_num(-9), keep_cont.nan_to_num(-9))
    assert cat2.dtype == cat.dtype and cont2.dtype == cont.dtype
    assert cat2.shape == cat.shape and cont2.shape == cont.shape
    assert mcat.dtype == torch.bool and mcat.shape == cat.shape and mcont.shape == cont.shape
    # 60k draws per block: the rate holds per block and per field
    assert abs(mcat.float().mean().item() - 0.3) < 0.02 and abs(mcont.float().mean().item() - 0.3) < 0.02
    assert (mcat.float().mean(0) - 0.3).abs().max() < 0.02 and (mcont.float().mean(0) - 0.3).abs().max() < 0.02
    # fields not replaced are exactly the input
    assert _same(cat2, cat)[~mcat].all() and _same(cont2, cont)[~mcont].all()
    # replaced fields take values of the same field in the training set
    for j in range(3):
        assert set(cat2[mcat[:, j], j].tolist()) <= set(cat[:, j].tolist())
    assert set(cat2[mcat[:, 1], 1].tolist()) <= {10, 11, 12}
    # without the mask, the plain call gives the same views
    assert torch.equal(corrupt(cat, cont, 0)[0], cat2)


def test_corruption_is_seeded(table):
    cat, cont = table[0][:500], table[1][:500]
    corrupt = TabularCorruption().fit(cat, cont)
    a = corrupt(cat, cont, torch.Generator().manual_seed(1))
    b = corrupt(cat, cont, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].nan_to_num(-9), b[1].nan_to_num(-9))
    c = corrupt(cat, cont, 2)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1].nan_to_num(-9), c[1].nan_to_num(-9))


def test_replacements_follow_each_fields_training_marginal(table):
    cat, cont = table
    corrupt = TabularCorruption().fit(cat, cont)
    # the batch is far from the training data, so replaced values can only come from fit
    n = 40000
    bcat = torch.full((n, 3), 7, dtype=torch.long)
    bcont = torch.full((n, 3), 1000.0)
    cat2, cont2, mcat, mcont = corrupt(bcat, bcont, 3, return_mask=True)
    # categorical field 0, missing code -1 included: frequencies of the replacements = training ones
    drawn = cat2[mcat[:, 0], 0].numpy()
    train = cat[:, 0].numpy()
    f_drawn = np.array([(drawn == c).mean() for c in CAT_CODES])
    f_train = np.array([(train == c).mean() for c in CAT_CODES])
    assert np.abs(f_drawn - f_train).max() < 0.02
    assert stats.chisquare(f_drawn * len(drawn), f_train * len(drawn)).pvalue > 0.01
    # continuous field 0: missing at the training rate, observed values match in distribution
    x = cont2[mcont[:, 0], 0].numpy()
    t = cont[:, 0].numpy()
    assert abs(np.isnan(x).mean() - np.isnan(t).mean()) < 0.02
    assert stats.ks_2samp(x[~np.isnan(x)], t[~np.isnan(t)]).pvalue > 0.01
    assert stats.ks_2samp(cont2[mcont[:, 2], 2].numpy(), cont[:, 2].numpy()).pvalue > 0.01
    # a moment-matched normal is not the empirical marginal: the test can tell them apart
    fake = np.random.default_rng(0).normal(np.nanmean(t), np.nanstd(t), size=(~np.isnan(x)).sum())
    assert stats.ks_2samp(fake, t[~np.isnan(t)]).pvalue < 1e-6
    # corrupting the training set itself leaves every field's marginal as it was
    _, cont3 = corrupt(cat, cont, 4)
    col = cont3[:, 2].numpy()
    assert stats.ks_2samp(col, cont[:, 2].numpy()).pvalue > 0.01


def test_fields_are_replaced_and_drawn_independently(table):
    cat, cont = table
    corrupt = TabularCorruption().fit(cat, cont)
    cat2, cont2, mcat, mcont = corrupt(cat, cont, 5, return_mask=True)
    masks = torch.cat([mcat, mcont], dim=1).double().numpy()
    r = np.corrcoef(masks, rowvar=False)
    off = r[~np.eye(6, dtype=bool)]
    assert np.abs(off).max() < 0.03  # no shared per-row switch
    # a row is not all-or-none: the number of replaced fields per row is Binomial(6, 0.3)
    k = masks.sum(1)
    assert 0.1 < ((k > 0) & (k < 6)).mean() and abs(k.var() - 6 * 0.3 * 0.7) < 0.1
    # fields 0 and 2 are identical in training and continuous 1 = 2 * continuous 0 + 1; where both are
    # replaced, independent draws break the link (a copied training row would keep it)
    both = mcat[:, 0] & mcat[:, 2]
    agree = (cat2[both, 0] == cat2[both, 2]).double().mean().item()
    assert abs(agree - float((CAT_PROBS ** 2).sum())) < 0.05  # chance agreement, not 1
    both = mcont[:, 0] & mcont[:, 1] & ~cont2[:, 0].isnan() & ~cont2[:, 1].isnan()
    rho = np.corrcoef(cont2[both, 0].numpy(), cont2[both, 1].numpy())[0, 1]
    assert abs(rho) < 0.08


def test_corruption_rate_edges_and_single_block(table):
    cat, cont = table[0][:200], table[1][:200]
    out_cat, out_cont = TabularCorruption(rate=0.0).fit(cat, cont)(cat, cont, 0)
    assert torch.equal(out_cat, cat) and torch.equal(out_cont.nan_to_num(-9), cont.nan_to_num(-9))
    *_, mcat, mcont = TabularCorruption(rate=1.0).fit(cat, cont)(cat, cont, 0, return_mask=True)
    assert mcat.all() and mcont.all()
    # a table with continuous fields only
    corrupt = TabularCorruption().fit(None, cont)
    assert (corrupt.n_categorical, corrupt.n_continuous, corrupt.n_train) == (0, 3, 200)
    c, x, mc, mx = corrupt(None, cont[:10], 0, return_mask=True)
    assert c is None and mc is None and x.shape == (10, 3) and mx.shape == (10, 3)


def test_corruption_errors(table):
    cat, cont = table[0][:100], table[1][:100]
    with pytest.raises(RuntimeError, match="not fitted"):
        TabularCorruption()(cat, cont, 0)
    corrupt = TabularCorruption().fit(cat, cont)
    with pytest.raises(ValueError, match=r"categorical: expected 3 fields .*got 2"):
        corrupt(cat[:, :2], cont, 0)
    with pytest.raises(ValueError, match=r"continuous: expected 3 fields .*got 4"):
        corrupt(cat, torch.cat([cont, cont[:, :1]], 1), 0)
    with pytest.raises(ValueError, match=r"continuous: expected 3 fields .*got 0"):
        corrupt(cat, None, 0)
    with pytest.raises(ValueError, match="batch size"):
        corrupt(cat, cont[:50], 0)
    with pytest.raises(ValueError, match="integer codes"):
        corrupt(cat.float(), cont, 0)
    with pytest.raises(ValueError, match="floating point"):
        corrupt(cat, cont.long(), 0)
    with pytest.raises(ValueError, match="generator"):
        corrupt(cat, cont, "seed")
    with pytest.raises(ValueError, match="rate"):
        TabularCorruption(rate=1.3)
    with pytest.raises(ValueError, match="same number of rows"):
        TabularCorruption().fit(cat, cont[:50])
    with pytest.raises(ValueError, match="at least one"):
        TabularCorruption().fit(None, None)
    with pytest.raises(ValueError, match="at least one training row"):
        TabularCorruption().fit(cat[:0], cont[:0])
