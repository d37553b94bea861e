"""The P4 cohort (chest CT + longitudinal EHR -> time to death, two sites): files, truth, planted effects."""

from __future__ import annotations

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
from scipy.stats import spearmanr

from mmlib.cohorts.ct_ehr import CTEHR, ehr_risk_score, planted_effect_checks, tour_figures
from mmlib.data import load_cohort
from mmlib.metrics import concordance_index

ROWS = {"image": 0, "ehr": 1, "age": 2, "scanner": 3, "coding": 4, "case_mix": 5}
# larger than smoke (planted effects need a few hundred subjects) but with the smoke's tiny volumes
BIG = dict(n_subjects=300)
ONE = dict(n_subjects=250)  # one modality carries everything: a strong effect, fewer subjects suffice


def _gen(root, seed=0, workers=2, **knobs):
    return CTEHR("smoke", **knobs).generate(out_dir=root, seed=seed, workers=workers, show_progress=False)


def _table(cohort):
    lat = cohort.latents().drop(columns=[c for c in cohort.subjects.columns if c != "subject_id"], errors="ignore")
    return cohort.subjects.assign(subject_id=cohort.subjects["subject_id"].astype(str)).merge(lat, on="subject_id")


def _cindex(df, risk):
    return concordance_index(df["event"].to_numpy(bool), df["time_days"].to_numpy(float), np.asarray(risk, float))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _gen(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Both modalities matter (image_share 0.5), sites shifted, age matters."""
    cohort = _gen(tmp_path_factory.mktemp("both"), tabular_signal=0.6, **BIG)
    return cohort, planted_effect_checks(cohort)


@pytest.fixture(scope="module")
def image_only(tmp_path_factory):
    """Only the CT carries the outcome; no site shift, no age effect."""
    cohort = _gen(tmp_path_factory.mktemp("img"), image_share=1.0, site_shift=0.0, tabular_signal=0.0, **ONE)
    return cohort, planted_effect_checks(cohort)


@pytest.fixture(scope="module")
def ehr_only(tmp_path_factory):
    cohort = _gen(tmp_path_factory.mktemp("ehr"), image_share=0.0, **ONE)
    return cohort, planted_effect_checks(cohort)


def test_manifest_validates_and_declares_survival_site_and_events(smoke):
    cohort = load_cohort(smoke.root)
    m = cohort.manifest
    assert m.survival.time == "time_days" and m.survival.event == "event" and m.site_column == "site"
    assert [mod.name for mod in m.modalities] == ["ct", "clot_mask"]
    assert "ehr_events" in cohort.tables and len(cohort) == 40
    header = (smoke.root / "subjects.csv").read_text().splitlines()[0].split(",")
    assert not {"u_img", "z_ehr", "lp", "clot_volume_ml"} & set(header)  # latents only in truth.json
    truth = cohort.truth["causal_model"]
    assert truth["beta_img"] == pytest.approx(1.2 * np.sqrt(0.5)) == truth["beta_ehr"]
    assert {"I50.9", "I50.22", "2160-0"} <= {v["code"] for v in truth["vocabulary"]}


def test_ct_is_int16_hu_ras_with_spacing_and_clot_is_a_filling_defect(smoke):
    df = _table(smoke)
    k = CTEHR("smoke").knobs
    for i in range(3):
        img, mask = nib.load(smoke.paths("ct")[i]), nib.load(smoke.paths("clot_mask")[i])
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.header.get_zooms() == pytest.approx(k.spacing_mm)
        assert img.shape == k.volume_shape and np.allclose(img.affine, mask.affine)
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        ct, clot = np.asanyarray(img.dataobj), np.asanyarray(mask.dataobj) > 0
        assert -1024 <= ct.min() and ct.min() < -900  # air
        # recorded latent = what the saved mask holds
        assert clot.sum() * np.prod(k.spacing_mm) / 1000 == pytest.approx(df["clot_volume_ml"].iloc[i], rel=1e-6)
        if clot.sum() >= 3 and df["site"].iloc[i] == "internal":
            assert ct[clot].mean() < 130 and np.percentile(ct, 99.9) > 200  # dark clot in bright contrast


def test_splits_sites_and_events_table(smoke):
    df = _table(smoke)
    assert set(df.loc[df["site"] == "external", "split"]) == {"external"}
    assert set(df.loc[df["site"] == "internal", "split"]) == {"train", "val", "test"}
    ev = smoke.tables["ehr_events"]
    assert set(ev["subject_id"].astype(str)) <= set(df["subject_id"])
    assert (ev["days_before_index"].astype(int) >= 0).all()  # nothing after the index CT
    labs = ev["code_system"] == "LOINC"
    assert ev.loc[labs, "value"].notna().all() and ev.loc[~labs, "value"].isna().all()
    assert ev.loc[labs, "unit"].notna().all()
    # visits are numbered chronologically; the index encounter (day 0) comes last
    one = ev[ev["subject_id"] == ev["subject_id"].iloc[0]].drop_duplicates("visit_id")
    assert one["days_before_index"].is_monotonic_decreasing and one["visit_id"].is_unique
    assert 40 <= ev["code"].nunique() <= 150


def test_planted_effects_present_with_both_modalities(both):
    cohort, checks = both
    assert list(checks.columns) == ["effect", "measure", "value", "chance", "present"]
    assert checks["present"].all(), checks
    assert checks["value"].iloc[ROWS["image"]] > 0.6 and checks["value"].iloc[ROWS["ehr"]] > 0.6
    df = _table(cohort)
    # the image renders the burden, and a simple chart-review score recovers the EHR state
    assert spearmanr(df["clot_volume_ml"], df["u_img"])[0] > 0.85
    assert spearmanr(ehr_risk_score(cohort.tables["ehr_events"], df["subject_id"]), df["z_ehr"])[0] > 0.6


def test_image_share_one_image_alone_predicts(image_only):
    cohort, checks = image_only
    df = _table(cohort)
    assert _cindex(df, df["u_img"]) > 0.68 and abs(_cindex(df, df["z_ehr"]) - 0.5) < 0.08
    assert checks["present"].iloc[ROWS["image"]] and checks["value"].iloc[ROWS["image"]] > 0.65
    for row in ("ehr", "age"):
        assert not checks["present"].iloc[ROWS[row]] and abs(checks["value"].iloc[ROWS[row]] - 0.5) < 0.08


def test_image_share_zero_ehr_alone_predicts(ehr_only):
    cohort, checks = ehr_only
    df = _table(cohort)
    assert _cindex(df, df["z_ehr"]) > 0.68 and abs(_cindex(df, df["u_img"]) - 0.5) < 0.08
    assert checks["present"].iloc[ROWS["ehr"]] and checks["value"].iloc[ROWS["ehr"]] > 0.65
    assert not checks["present"].iloc[ROWS["image"]] and abs(checks["value"].iloc[ROWS["image"]] - 0.5) < 0.08


def test_site_shift_changes_ct_and_coding_only_when_on(both, image_only):
    for (cohort, checks), on in ((both, True), (image_only, False)):
        for row in ("scanner", "coding", "case_mix"):
            assert bool(checks["present"].iloc[ROWS[row]]) is on, (row, checks)
        df = _table(cohort)
        ext = (df["site"] == "external").to_numpy()
        mean_hu = np.array([np.asanyarray(nib.load(p).dataobj).mean() for p in cohort.paths("ct")[:120]])
        gap = abs(mean_hu[ext[:120]].mean() - mean_hu[~ext[:120]].mean())
        ev = cohort.tables["ehr_events"]
        sibling = ev["code"].astype(str).isin(["I50.22", "N18.30", "J44.1", "E11.65", "B01AF02"])
        assert bool(sibling.any()) is on  # external sibling codes exist only with a shift
        if on:
            assert gap > 20  # offset 15 HU and scale 0.96 about water: air reads ~ +55 HU
            assert set(ev.loc[sibling, "subject_id"].astype(str)) <= set(df.loc[ext, "subject_id"])
            assert ev["unit"].astype(str).eq("umol/L").any()
        else:
            assert gap < 15  # only case mix (body size) differs


def test_knob_checks():
    with pytest.raises(ValueError, match="image_share"):
        CTEHR("smoke", image_share=1.5).plan(np.random.default_rng(0))
    with pytest.raises(ValueError, match="no field"):
        CTEHR("smoke", image_signal=0.0)


def test_tour_figures(smoke):
    figs = tour_figures(smoke)
    assert set(figs) == {"ct_slices", "ehr_timelines", "code_frequency_by_site", "kaplan_meier"}
    timelines = figs["ehr_timelines"]
    timelines.canvas.draw()
    renderer = timelines.canvas.get_renderer()
    legend = timelines.legends[0].get_window_extent(renderer)  # one legend, off every panel (inside, it hid events)
    assert all(ax.get_legend() is None for ax in timelines.axes)
    ct = [ax for ax in figs["ct_slices"].axes if ax.get_label() != "<colorbar>"]
    assert ct and all(ax.xaxis_inverted() and [t.get_text() for t in ax.texts] == ["R", "L"] for ax in ct)
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in timelines.axes if ax.axison)
    for fig in figs.values():
        assert fig.get_size_inches()[0] * fig.dpi >= 1400 or fig.get_size_inches()[0] >= 14
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]
        assert panels and all(ax.get_title() and ax.get_xlabel() for ax in panels)
        plt.close(fig)
    checks = planted_effect_checks(smoke)  # runs on a tiny cohort too
    assert len(checks) == 6 and checks["value"].notna().all()
