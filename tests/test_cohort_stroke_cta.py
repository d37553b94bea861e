"""The P2 stroke CTA cohort: determinism, manifest, geometry and HU, the selection rule, planted effects."""

from __future__ import annotations

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest

from mmlib.cohorts.stroke_cta import (
    KAPPA_DAYS,
    StrokeCTA,
    _cindex,
    _cox_loglik,
    finetune_rule,
    planted_effect_checks,
    tour_figures,
)
from mmlib.data import load_cohort

# effect cohorts: more relapses than the paper, so ~100 events give the checks power at smoke size
EFFECT = {"n_subjects": 240, "relapse_5y": 0.3}
# the fewest subjects (for seeds 0 and 1) that still give every split both outcomes, for speed
SMALL = {"n_subjects": 80, "relapse_5y": 0.3}


def _make(tmp_path_factory, name: str, seed: int = 0, workers: int = 2, **knobs):
    out = tmp_path_factory.mktemp(name)
    return StrokeCTA("smoke", **knobs).generate(out_dir=out, seed=seed, workers=workers, show_progress=False)


@pytest.fixture(scope="module")
def signal(tmp_path_factory):
    return _make(tmp_path_factory, "signal", **EFFECT)


@pytest.fixture(scope="module")
def no_image(tmp_path_factory):
    # no image -> hazard and no attribute -> severity link: severity is then independent of outcome
    return _make(tmp_path_factory, "no_image", image_signal=0.0, plaque_risk=0.0, **EFFECT)


@pytest.fixture(scope="module")
def no_tabular(tmp_path_factory):
    return _make(tmp_path_factory, "no_tab", tabular_signal=0.0, plaque_side="both", **EFFECT)


@pytest.fixture(scope="module")
def geometry(tmp_path_factory):
    # finer voxels and no bending, so anatomy sits where the template puts it
    return _make(
        tmp_path_factory, "geometry", volume_shape=(56, 56, 84), spacing_mm=(4.0, 4.0, 4.0),
        deformation_mm=0.0, plaque_side="right", **SMALL,
    )


def test_manifest_validates_and_tables_are_typed(signal):
    cohort = load_cohort(signal.root)
    s = cohort.subjects
    assert len(s) == EFFECT["n_subjects"]
    assert set(s["gender"].astype(str)) == {"M", "F"}
    assert set(s["chd"].astype(int)) == {0, 1} and set(s["pad"].astype(int)) == {0, 1}
    assert (s["rfs_days"] >= 1).all() and set(s["relapse"].astype(int)) == {0, 1}
    assert cohort.manifest.survival.time == "rfs_days" and cohort.manifest.labels == ["relapse_within_kappa"]
    lat = cohort.latents()
    assert {"severity_pct", "plaque_volume_mm3", "plaque_left_ijk", "lp_image"} <= set(lat.columns)
    assert lat["severity_pct"].between(0, 90).all()
    header = (signal.root / "subjects.csv").read_text().splitlines()[0].split(",")
    assert "severity_pct" not in header  # latent, in truth.json only


def test_selection_rule_label_and_nested_splits(signal):
    s = signal.subjects
    rfs, ev = s["rfs_days"].to_numpy(int), s["relapse"].to_numpy(int).astype(bool)
    expected = (ev & (rfs < 1642)) | (~ev & (rfs >= 1825) & (rfs <= 2555))
    assert np.array_equal(s["finetune"].to_numpy(bool), expected)
    assert np.array_equal(finetune_rule(rfs, ev), expected)
    ft = s["finetune"].to_numpy(bool)
    label = s["relapse_within_kappa"]
    assert label[~ft].isna().all() and label[ft].notna().all()
    assert np.array_equal(label[ft].to_numpy(int), (ev & (rfs < KAPPA_DAYS))[ft].astype(int))
    split, pre = s["split"].astype(str).to_numpy(), s["pretrain_split"].astype(str).to_numpy()
    assert set(split[ft]) == {"train", "test"} and set(split[~ft]) == {"pretrain_train", "pretrain_val"}
    # as in the paper: every fine-tuning test patient is in the pretraining validation split
    assert (pre[split == "test"] == "val").all() and (pre[split == "train"] == "train").all()
    assert (pre[split == "pretrain_val"] == "val").all() and (pre[split == "pretrain_train"] == "train").all()
    assert 0.15 < (pre == "val").mean() < 0.25
    assert 0.1 < (split[ft] == "test").mean() < 0.3


def test_nifti_geometry_and_hounsfield_units(geometry):
    cohort = geometry
    img = nib.load(cohort.paths("cta")[0])
    mask = nib.load(cohort.paths("plaque_mask")[0])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.shape == (56, 56, 84) and img.header.get_zooms() == (4.0, 4.0, 4.0)
    assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, mask.affine)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    vol = np.asarray(img.dataobj).astype(float)
    row = cohort.latents().iloc[0]
    inv = np.linalg.inv(img.affine)
    assert np.median(vol[:4, :4, :]) < -950  # air in the corners
    assert vol.max() > 600  # skull, vertebrae
    # common carotid arteries, 60 mm below the bifurcation, where the template puts them
    z = row["bifurcation_z_mm"] - 60
    for side in (-1, 1):
        x, y = side * row["carotid_x_mm"] * row["body_scale"], row["carotid_y_mm"] * row["body_scale"]
        i, j, k = np.rint(inv @ [x, y, z, 1])[:3].astype(int)
        assert vol[i - 1 : i + 2, j - 1 : j + 2, k].max() > 200
    # the skull at the vertex is bone
    k_top = int(np.rint(inv @ [0, 5, row["head_z_mm"] + 76 * row["head_scale"] - 7, 1])[2])
    assert vol[:, :, k_top].max() > 600


def test_plaque_on_the_requested_side(signal, no_tabular, geometry):
    for cohort, side in ((signal, "left"), (geometry, "right")):
        for path in cohort.paths("plaque_mask")[:40]:
            img = nib.load(path)
            ijk = np.argwhere(np.asarray(img.dataobj) > 0)
            if len(ijk):
                x = ijk @ img.affine[:3, :3].T[:, 0] + img.affine[0, 3]  # RAS+ x: > 0 is the subject's right
                assert (x < 0).all() if side == "left" else (x > 0).all()
    # "both": the same severity on each side (at 7 mm voxels a thin plaque may miss the mask on one side)
    lat = no_tabular.latents()
    left, right = lat["plaque_left_ijk"].notna(), lat["plaque_right_ijk"].notna()
    assert left.sum() > 50 and right.sum() > 50 and (left & right).sum() > 0.7 * (left | right).sum()
    severe = lat["severity_pct"] > 40
    assert (left & right)[severe].mean() > 0.9


def test_planted_effects_present(signal):
    table = planted_effect_checks(signal).set_index("effect")
    assert table["present"].all(), table
    v = table["value"].to_numpy()
    assert v[0] > 0.6  # residualised c-index of the measured plaque
    assert v[1] > 18.5  # LR chi2 of the attributes, p < 0.001
    assert v[2] > 0.2  # CV correlation attributes -> plaque
    assert v[3] > 0.65  # AUC of plaque for relapse within kappa
    assert v[4] > 0.7  # masks encode severity
    s, lat = signal.subjects, signal.latents()
    assert _cindex(s["rfs_days"].to_numpy(), s["relapse"].to_numpy(), lat["severity_pct"].to_numpy()) > 0.65


def test_effects_absent_when_switched_off(no_image, no_tabular):
    off = planted_effect_checks(no_image)
    assert not off["present"][0] and abs(off["value"][0] - 0.5) < 0.07
    assert not off["present"][2] and abs(off["value"][2]) < 0.25
    assert not off["present"][3]
    assert off["present"][1] and off["present"][4]  # the attributes' hazard and the rendering remain
    s, lat = no_image.subjects, no_image.latents()
    assert abs(_cindex(s["rfs_days"].to_numpy(), s["relapse"].to_numpy(), lat["severity_pct"].to_numpy()) - 0.5) < 0.07
    tab = planted_effect_checks(no_tabular)
    assert not tab["present"][1] and tab["value"][1] < 18.5
    assert tab["present"][0] and tab["present"][2] and tab["present"][3]


def test_tour_figures(geometry):
    figs = tour_figures(geometry)
    assert set(figs) == {"cta_mip", "bifurcation_slice", "km_by_severity"}
    for name in ("cta_mip", "bifurcation_slice"):  # radiological: the subject's right on the viewer's left, marked
        panels = [ax for ax in figs[name].axes if ax.get_label() != "<colorbar>"]
        assert panels and all(ax.xaxis_inverted() and [t.get_text() for t in ax.texts] == ["R", "L"] for ax in panels)
    km = figs["km_by_severity"].axes[0]
    curves = [line for line in km.get_lines() if "tertile" in str(line.get_label())]
    assert curves and all(tuple(c.get_xydata()[0]) == (0.0, 1.0) for c in curves)  # every curve starts at t = 0, S = 1
    assert km.collections  # with its confidence band
    for fig in figs.values():
        assert fig.axes and fig.get_size_inches()[0] >= 9
        plt.close(fig)


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="plaque_side"):
        StrokeCTA("smoke", plaque_side="middle")
    with pytest.raises(ValueError, match="no field"):
        StrokeCTA("smoke", plaque_effect=0.0)


def test_cox_loglik_matches_scikit_survival():
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.linear_model.coxph import CoxPHOptimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    time = np.ceil(rng.exponential(100 * np.exp(-x[:, 0]))) + 1  # integer days: ties
    event = rng.random(200) < 0.7
    y = np.array(list(zip(event, time, strict=True)), dtype=[("e", bool), ("t", float)])
    beta = CoxPHSurvivalAnalysis(alpha=1e-6, ties="breslow").fit(x, y).coef_
    ref = -CoxPHOptimizer(x, event, time, np.zeros(3), "breslow").nlog_likelihood(beta) * len(time)
    assert _cox_loglik(time, event.astype(int), x) == pytest.approx(ref, rel=1e-6)
