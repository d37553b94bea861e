"""The P1 stroke-MRI cohort: determinism, manifest, geometry, planted effects and their absence."""

from __future__ import annotations

import matplotlib.figure
import nibabel as nib
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from mmlib.cohorts import generator
from mmlib.cohorts.stroke_mri import (
    ALL_REGIONS,
    MAR_FIELDS,
    MCAR_FIELDS,
    REGIONS,
    StrokeMRI,
    anatomy,
    planted_effect_checks,
    tour_figures,
)
from mmlib.data import load_cohort

# smoke's 8 mm voxels with enough subjects to see the effects: 300 labelled + a 100 pool
BIG = dict(n_subjects=400, n_labelled=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return StrokeMRI("smoke").generate(out_dir=tmp_path_factory.mktemp("smoke"), seed=0, show_progress=False)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    cohort = StrokeMRI("smoke", **BIG).generate(out_dir=tmp_path_factory.mktemp("big"), seed=0, show_progress=False)
    return cohort, planted_effect_checks(cohort).set_index("knob")


@pytest.fixture(scope="module")
def no_image(tmp_path_factory):
    gen = StrokeMRI("smoke", **BIG, image_signal=0.0)
    cohort = gen.generate(out_dir=tmp_path_factory.mktemp("no_image"), seed=0, show_progress=False)
    return cohort, planted_effect_checks(cohort).set_index("knob")


def _row(checks, knob):
    return checks.loc[knob]


def test_manifest_validates_with_splits_labels_and_types(smoke):
    cohort = load_cohort(smoke.root)
    df = cohort.subjects
    assert len(df) == 24 and df["subject_id"].is_unique and df["subject_id"].iloc[0].startswith("sub-")
    assert set(df["split"]) == {"pretrain", "train", "val", "test"}
    assert df.loc[df["split"] == "pretrain", "stroke"].isna().all()
    for split in ("train", "val", "test"):
        assert set(df.loc[df["split"] == split, "stroke"]) == {0, 1}  # both classes in every labelled split
    labelled = df[df["split"] != "pretrain"]
    assert len(labelled) == 16 and labelled["stroke"].sum() == 8  # class-balanced (case_fraction 0.5)
    m = cohort.manifest
    clinical = [c for c in m.columns if c.name not in ("split", "stroke", "assessment_centre")]
    assert len(clinical) >= 18 and {c.dtype for c in clinical} >= {"float", "category", "bool"}
    assert m.column("sbp").unit == "mmHg" and m.column("age").unit == "years"
    assert m.site_column == "assessment_centre" and m.labels == ["stroke"]
    assert {mod.name for mod in m.modalities} == {"flair", "lesion_mask"}
    assert df["age"].dtype == float and str(df["smoking_status"].dtype) == "category"
    truth = cohort.truth["causal_model"]
    assert truth["lesion_region"] == "periventricular_left"
    for f, e in truth["effects_log_odds_per_unit"].items():
        assert e["total"] == pytest.approx(e["direct"] + e["indirect_via_wmh"], abs=1e-4), f


@pytest.mark.parametrize("spacing", [(8.0, 8.0, 8.0), (6.0, 6.0, 6.0)])
def test_nifti_is_ras_mni_with_the_knob_spacing(spacing, smoke, tmp_path):
    cohort = smoke if spacing == (8.0, 8.0, 8.0) else StrokeMRI(
        "smoke", spacing_mm=spacing, n_subjects=8, n_labelled=6
    ).generate(out_dir=tmp_path, seed=0, show_progress=False)
    sid = cohort.ids[0]
    flair, mask = nib.load(cohort.path("flair", sid)), nib.load(cohort.path("lesion_mask", sid))
    for img in (flair, mask):
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert tuple(float(z) for z in img.header.get_zooms()) == spacing
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert np.allclose(img.affine, anatomy(spacing)["affine"])
    assert flair.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert flair.shape == tuple(round(f / s) for f, s in zip((152, 188, 160), spacing))
    # MNI space: the anterior commissure (0, 0, 0) lies inside the brain, a corner of the box does not
    data = np.asarray(flair.dataobj)
    origin = np.round(np.linalg.inv(flair.affine) @ [0, 0, 0, 1]).astype(int)[:3]
    assert data[tuple(origin)] > 0 and data[0, 0, 0] == 0


def test_every_planted_effect_is_present(big):
    _, checks = big
    assert checks["present"].all(), checks
    assert _row(checks, "image_signal")["value"] > 0.65  # direct WMH effect, beyond the clinical fields
    assert _row(checks, "tabular_signal")["value"] > 0.7  # direct clinical effect, beyond WMH
    assert _row(checks, "risk_to_lesion")["value"] > 0.3  # risk factors -> WMH
    assert _row(checks, "atrophy_mm_per_decade")["value"] > 0.4
    assert set(checks.columns) >= {"effect", "measure", "value", "chance", "present"}


def test_no_image_signal_leaves_the_image_at_chance_but_keeps_the_confounding(no_image):
    _, checks = no_image
    direct = _row(checks, "image_signal")
    assert not direct["present"] and abs(direct["value"] - 0.5) < direct["margin"]
    # the WMH load alone still predicts stroke: age, SBP, diabetes and smoking cause both
    total = checks[checks["effect"].str.contains("WMH load in .*, total", regex=True)].iloc[0]
    assert total["value"] > 0.55  # (the plan-level test below shows it with more subjects)
    assert _row(checks, "tabular_signal")["present"]


def test_confounding_and_prevalence_in_the_plan():
    """The planned truth, without rendering: intercept solved, confounding path switchable."""

    def plan(**knobs):
        gen = StrokeMRI("smoke", n_subjects=3000, n_labelled=1000, **knobs)
        return gen.plan(np.random.default_rng(1))

    p = plan(image_signal=0.0)
    pop = p.truth["sampling"]
    assert pop["population_cases"] / pop["population"] == pytest.approx(0.1, abs=0.015)
    lab = p.subjects[p.subjects["stroke"].notna()]
    load = np.log(lab["planned_load_periventricular_left_ml"])
    assert roc_auc_score(lab["stroke"].astype(int), load) > 0.58  # confounded, not causal
    q = plan(image_signal=0.0, risk_to_lesion=0.0).subjects
    lab0 = q[q["stroke"].notna()]
    auc0 = roc_auc_score(lab0["stroke"].astype(int), np.log(lab0["planned_load_periventricular_left_ml"]))
    assert abs(auc0 - 0.5) < 0.05  # no path from the load to stroke left


def test_lesion_region_knob_moves_the_signal():
    gen = StrokeMRI("smoke", lesion_region="deep_wm_frontal_right", n_subjects=400, n_labelled=100)
    df = gen.plan(np.random.default_rng(0)).subjects
    rho = {r: stats.spearmanr(df["lp_image"], df[f"planned_load_{r}_ml"]).statistic for r in ALL_REGIONS}
    assert rho["deep_wm_frontal_right"] == pytest.approx(1.0)
    assert max(v for r, v in rho.items() if r != "deep_wm_frontal_right") < 0.7
    with pytest.raises(ValueError, match="lesion_region"):
        StrokeMRI("smoke", lesion_region="cerebellum")
    assert generator("stroke_mri", "smoke").knobs.lesion_region in REGIONS


def test_lesions_lie_in_white_matter_and_are_measured_from_the_masks(big):
    cohort, _ = big
    lat = cohort.latents().set_index("subject_id")
    anat = anatomy(cohort.truth["knobs"]["spacing_mm"])
    k = ALL_REGIONS.index("periventricular_left") + 1
    in_wm, loads, ratios = [], [], []
    for sid in cohort.ids[:60]:
        mask = np.asarray(nib.load(cohort.path("lesion_mask", sid)).dataobj) > 0
        flair = np.asarray(nib.load(cohort.path("flair", sid)).dataobj)
        loads.append(((mask & (anat["atlas"] == k)).sum() * 0.512, lat.loc[sid, "lesion_load_periventricular_left_ml"]))
        if mask.any():
            in_wm.append((anat["wm"][mask] > 0.5).mean())
            ratios.append(np.median(flair[mask]) / np.median(flair[(anat["wm"] > 0.9) & ~mask]))
    assert np.mean(in_wm) > 0.9 and min(in_wm) > 0.6  # displaced by the deformation at most
    assert np.median(ratios) > 1.3  # hyperintense on FLAIR
    loads = np.array(loads)
    assert np.allclose(loads[:, 0], loads[:, 1])  # the truth's load is the one on disk
    planned = lat.loc[cohort.ids, "planned_load_periventricular_left_ml"]
    measured = lat.loc[cohort.ids, "lesion_load_periventricular_left_ml"]
    assert stats.spearmanr(planned, measured).statistic > 0.85


def test_ventricles_widen_with_age(big):
    cohort, checks = big
    lat = cohort.latents().merge(cohort.subjects[["subject_id", "age"]], on="subject_id")
    assert stats.pearsonr(lat["age"], lat["ventricle_volume_ml"]).statistic > 0.6
    young, old = lat[lat["age"] < 58], lat[lat["age"] > 70]
    assert old["ventricle_volume_ml"].mean() > young["ventricle_volume_ml"].mean() + 5  # ml
    assert old["brain_tissue_volume_ml"].mean() < young["brain_tissue_volume_ml"].mean()
    assert _row(checks, "atrophy_mm_per_decade")["present"]  # also seen on the FLAIR files


def test_missingness_follows_the_knobs(big):
    cohort, _ = big
    df = cohort.subjects
    mcar = df[list(MCAR_FIELDS)].isna().to_numpy().mean()
    assert mcar == pytest.approx(0.03, abs=0.012)
    mar = df[list(MAR_FIELDS)].isna()
    young = df["age"] < df["age"].median()
    assert mar.to_numpy().mean() == pytest.approx(0.03 + 0.10, abs=0.03)
    assert mar[young].to_numpy().mean() > mar[~young].to_numpy().mean() + 0.04  # MAR: the young miss more
    for col in ("age", "sex", "assessment_centre", "atrial_fibrillation", "split"):
        assert df[col].notna().all()
    heavy = StrokeMRI("smoke", n_subjects=2000, n_labelled=100, missing_rate=0.2, mar_missing=0.0)
    planned = heavy.plan(np.random.default_rng(0)).subjects
    assert planned[list(MCAR_FIELDS + MAR_FIELDS)].isna().to_numpy().mean() == pytest.approx(0.2, abs=0.01)


def test_tour_figures(big):
    import matplotlib.pyplot as plt

    cohort, _ = big
    figs = tour_figures(cohort)
    assert set(figs) == {"slices", "outcome_vs_age"}
    # axial and coronal: radiological (the subject's right on the viewer's left, marked); sagittal: from the left
    panels = np.array([ax for ax in figs["slices"].axes if ax.get_label() != "<colorbar>"]).reshape(-1, 3)
    for row in panels:
        assert all(ax.xaxis_inverted() for ax in row)
        assert [[t.get_text() for t in ax.texts] for ax in row] == [["R", "L"], ["R", "L"], []]
    for fig in figs.values():
        assert isinstance(fig, matplotlib.figure.Figure)
        assert all(ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>")
        plt.close(fig)
