"""The P3 cohort (chest X-ray + 12-lead ECG + reports): formats, determinism, planted effects."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from mmlib.cohorts.base import recorded_checksums
from mmlib.cohorts.xray_ecg import (
    ECG_CLASSES,
    FINDING_BITS,
    LEADS,
    NEGATION_CUES,
    UNCERTAINTY_CUES,
    XRAY_FINDINGS,
    XrayECGReports,
    ecg_features,
    finding_mask,
    measure_ctr,
    planted_effect_checks,
    read_ecg,
    render_xray,
    report_labels,
)

# big enough for every planted effect to clear its 3-SD margin, small enough to render in seconds
EFFECT_KNOBS = {"n_subjects": 300, "image_size": 64}
SIGNAL_KNOBS = ("image_signal", "ecg_signal", "coupling")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("xray_ecg_on")
    return XrayECGReports("smoke", **EFFECT_KNOBS).generate(out_dir=out, seed=0, workers=2, show_progress=False)


@pytest.fixture(scope="module")
def null_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("xray_ecg_off")
    knobs = {**EFFECT_KNOBS, **dict.fromkeys(SIGNAL_KNOBS, 0.0)}
    return XrayECGReports("smoke", **knobs).generate(out_dir=out, seed=0, workers=2, show_progress=False)


@pytest.fixture(scope="module")
def checks(cohort):
    return planted_effect_checks(cohort).set_index("effect", append=True)


def test_manifest_columns_splits_and_truth(cohort):
    # every subject has 6 files: PNG, ECG .dat and .hea, two reports, findings mask
    sums = recorded_checksums(cohort.root)
    assert sum(k.startswith(("xray/", "ecg/", "reports/", "masks/")) for k in sums) == 6 * len(cohort)
    m = cohort.manifest
    assert [mod.name for mod in m.modalities] == ["xray", "ecg", "report", "ecg_statement", "findings_mask"]
    assert [mod.format for mod in m.modalities] == ["png", "wfdb", "text", "text", "png"]
    assert m.labels == [*XRAY_FINDINGS, *ECG_CLASSES]
    sub = cohort.subjects
    assert len(sub) == EFFECT_KNOBS["n_subjects"] and sub["subject_id"].iloc[0] == "sub-0001"
    assert set(sub["split"]) == {"train", "val", "test"}
    assert abs((sub["split"] == "train").mean() - 0.7) < 0.05
    # NORM is exactly "none of the four ECG superclasses"
    assert (sub["NORM"] == 1 - sub[["MI", "STTC", "CD", "HYP"]].max(axis=1)).all()
    # latents (conditions, true findings, rendered quantities) live in truth.json only
    header = (cohort.root / "subjects.csv").read_text().splitlines()[0].split(",")
    assert "ctr" not in header and "cond_heart_failure" not in header
    lat = cohort.latents()
    assert {"cond_heart_failure", "true_cardiomegaly", "ctr_rendered", "qrs_ms_clean", "report_sentences"} <= set(lat)
    p = cohort.truth["causal_model"]["condition_to_finding_probability"]
    assert p["heart_failure"]["cardiomegaly"] == 0.75 and p["prior_mi"]["MI"] == 0.8


def test_png_and_wfdb_files(cohort):
    import wfdb

    img = Image.open(cohort.paths("xray")[0])
    assert img.mode == "L" and img.size == (EFFECT_KNOBS["image_size"],) * 2
    rec = wfdb.rdrecord(str(cohort.paths("ecg")[0]))
    assert rec.n_sig == 12 and rec.sig_name == list(LEADS) and rec.fs == 100 and rec.sig_len == 1000
    assert rec.units == ["mV"] * 12 and rec.comments[0].startswith("age: ")
    sig, fs = read_ecg(cohort.paths("ecg")[0])
    np.testing.assert_allclose(sig, rec.p_signal)  # the fast reader agrees with wfdb
    lead = {k: sig[:, i] for i, k in enumerate(LEADS)}
    # one heart vector behind all leads: Einthoven and Goldberger hold (to the 1 uV storage step)
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=0.002)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=0.002)
    assert 0.3 < np.ptp(lead["V5"]) < 5  # millivolts, not arbitrary units


def test_planted_effects_recovered(checks):
    assert checks["present"].all(), checks
    v = checks["value"].droplevel(0)
    assert v["cardiomegaly widens the heart shadow"] > 0.9
    assert v["conduction disease widens the QRS"] > 0.85
    assert v["hypertrophy raises the QRS voltage"] > 0.8
    assert v["prior MI leaves Q waves and T inversion"] > 0.8
    assert v["the radiology report states the X-ray labels"] == 1.0
    assert v["the ECG statement states the ECG labels"] == 1.0
    assert (checks["value"] > checks["chance"] + 0.15).all()


def test_no_signal_no_effect(null_cohort):
    df = planted_effect_checks(null_cohort)
    text = df["effect"].str.contains("states")  # reports are written from the labels whatever the knobs
    assert df.loc[text, "present"].all()
    assert not df.loc[~text, "present"].any(), df
    assert (np.abs(df.loc[~text, "value"] - df.loc[~text, "chance"]) < 0.12).all(), df


@pytest.fixture(scope="module")
def masks(cohort):
    """(N, S, S) uint8 findings masks and (N, S, S) float X-rays, read from the files."""
    xr = np.stack([np.asarray(Image.open(p), dtype=float) for p in cohort.paths("xray")])
    imgs = [Image.open(p) for p in cohort.paths("findings_mask")]
    assert all(im.mode == "L" for im in imgs)
    return np.stack([np.asarray(im) for im in imgs]), xr


def test_findings_mask_files_and_bits(cohort, masks):
    mk, xr = masks
    assert mk.shape == xr.shape and mk.dtype == np.uint8
    assert all(p.is_file() for p in cohort.paths("findings_mask"))
    assert cohort.subjects["findings_mask"].str.fullmatch(r"masks/sub-\d{4}_findings\.png").all()
    assert not (mk & ~np.uint8(sum(FINDING_BITS.values()))).any()  # only the 4 finding bits
    lat = cohort.latents()
    for f in XRAY_FINDINGS:  # a bit is set if and only if the finding is truly present (not the noisy label)
        present = lat[f"true_{f}"].astype(bool).to_numpy()
        nonempty = np.array([finding_mask(m, f).any() for m in mk])
        np.testing.assert_array_equal(nonempty, present, err_msg=f)
    # the labels disagree with the true findings somewhere (label noise), and the masks follow the truth
    assert any((cohort.subjects[f].to_numpy() != lat[f"true_{f}"].astype(int).to_numpy()).any() for f in XRAY_FINDINGS)


def test_findings_mask_locates_the_planted_findings(cohort, masks):
    mk, xr = masks
    lat = cohort.latents()
    _, size, _ = mk.shape
    # effusion: on the recorded side (patient's right = image left) and in the lower half of the image
    eff = lat["true_pleural_effusion"].astype(bool).to_numpy()
    for i in np.flatnonzero(eff):
        rows, cols = np.nonzero(finding_mask(mk[i], "pleural_effusion"))
        assert rows.min() >= size // 2, i
        side = lat.loc[i, "effusion_side"]
        left, right = (cols < size / 2).any(), (cols >= size / 2).any()
        assert (left, right) == {"right": (True, False), "left": (False, True), "bilateral": (True, True)}[side], i
    # the fluid is in the image where the mask says: brighter than the same pixels of patients without effusion
    gain = []
    for i in np.flatnonzero(eff):
        m = finding_mask(mk[i], "pleural_effusion")
        gain.append(xr[i][m].mean() - xr[~eff][:, m].mean())
    assert np.median(gain) > 20 and np.mean(np.array(gain) > 0) > 0.9, gain
    # heart: wider (as a fraction of the image) with cardiomegaly than without
    cm = lat["true_cardiomegaly"].astype(bool).to_numpy()
    width = np.array([finding_mask(m, "cardiomegaly").sum(axis=1).max() / size for m in mk[cm]])
    # ctr_rendered was measured on the same heart silhouette: the implied thorax spans 65-85% of the image
    assert np.all(np.abs(width / lat.loc[cm, "ctr_rendered"].to_numpy() - 0.75) < 0.1)
    others = []  # the heart silhouette the others' images show, drawn into a mask by flagging cardiomegaly
    for i, row in enumerate(lat.loc[~cm].head(60).to_dict(orient="records")):
        _, _, m = render_xray({**row, "true_cardiomegaly": True}, np.random.default_rng(i), size,
                              image_signal=1.0, noise_sd=1.0)
        others.append(finding_mask(m, "cardiomegaly").sum(axis=1).max() / size)
    assert width.mean() > np.mean(others) + 0.06, (width.mean(), np.mean(others))
    # edema and atelectasis masks lie inside the thorax, not at the image border
    for f in ("edema", "atelectasis"):
        assert not any(finding_mask(m, f)[[0, -1]].any() or finding_mask(m, f)[:, [0, -1]].any() for m in mk), f


def test_finding_mask_decodes_bits():
    mask = np.array([[0, 1, 2, 4, 8, 15]], dtype=np.uint8)
    assert finding_mask(mask, "atelectasis").tolist() == [[False, True, False, False, False, True]]
    assert finding_mask(mask, "pleural_effusion").tolist() == [[False, False, False, False, True, True]]
    assert set(FINDING_BITS) == set(XRAY_FINDINGS)
    with pytest.raises(ValueError, match="pneumothorax"):
        finding_mask(mask, "pneumothorax")


def test_ctr_measured_from_png(cohort):
    lat = cohort.latents()
    measured = np.array([measure_ctr(np.asarray(Image.open(p))) for p in cohort.paths("xray")])
    assert np.corrcoef(measured, lat["ctr_rendered"])[0, 1] > 0.9
    cm = lat["true_cardiomegaly"].astype(bool).to_numpy()
    assert np.median(measured[cm]) > 0.52 and np.median(measured[~cm]) < 0.48


def test_ecg_criteria_from_wfdb(cohort):
    import wfdb

    lat = cohort.latents()
    feats = []
    for p in cohort.paths("ecg"):
        rec = wfdb.rdrecord(str(p))
        feats.append(ecg_features(rec.p_signal, rec.fs))
    qrs = np.array([f["qrs_ms"] for f in feats])
    sl = np.array([f["sokolow_lyon_mv"] for f in feats])
    norm, cd, hyp = (lat[f"true_{c}"].astype(bool).to_numpy() for c in ("NORM", "CD", "HYP"))
    assert np.median(qrs[cd]) >= 120 and np.median(qrs[norm]) < 110  # bundle-branch block: QRS >= 120 ms
    assert np.median(sl[hyp]) > 3.5 and np.median(sl[norm]) < 3.0  # Sokolow-Lyon > 3.5 mV
    # the file measurement matches the noise-free one recorded at generation
    assert np.corrcoef(qrs, lat["qrs_ms_clean"])[0, 1] > 0.9


def test_neurokit2_finds_the_planted_beats(cohort):
    nk = pytest.importorskip("neurokit2")
    lat = cohort.latents()
    for i in range(0, 60, 6):
        sig, fs = read_ecg(cohort.paths("ecg")[i])
        _, info = nk.ecg_peaks(sig[:, LEADS.index("II")], sampling_rate=int(fs))
        assert abs(len(info["ECG_R_Peaks"]) - lat.loc[i, "heart_rate_bpm"] * 10 / 60) <= 1.5


def test_reports_negate_and_hedge_as_annotated(cohort):
    lat = cohort.latents()
    sub = cohort.subjects
    hedged, positive = 0, 0
    for i, path in enumerate(cohort.paths("report")):
        text = path.read_text()
        assert text.startswith("EXAMINATION:") and "FINDINGS:" in text and "IMPRESSION:" in text
        assert report_labels(text) == {f: int(sub.loc[i, f]) for f in XRAY_FINDINGS}
        for ann in lat.loc[i, "report_sentences"]:
            if ann["label"] is None:
                continue
            low = ann["text"].lower()
            has_neg = any(re.search(c, low) for c in NEGATION_CUES)
            has_unc = any(re.search(c, low) for c in UNCERTAINTY_CUES)
            if sub.loc[i, ann["label"]] == 0:  # a negative label is only ever negated, with a cue
                assert ann["polarity"] == "negated" and has_neg and not has_unc, ann
            else:
                assert ann["polarity"] in ("positive", "uncertain") and not (has_neg and not has_unc), ann
                assert has_unc == (ann["polarity"] == "uncertain"), ann
                positive += 1
                hedged += ann["polarity"] == "uncertain"
    assert 0.07 < hedged / positive < 0.25  # uncertain_rate = 0.15
    for i, path in enumerate(cohort.paths("ecg_statement")):
        assert report_labels(path.read_text(), ECG_CLASSES) == {c: int(sub.loc[i, c]) for c in ECG_CLASSES}


def _phi(a, b):
    return float(np.corrcoef(a.astype(float), b.astype(float))[0, 1])


def test_coupling_sets_cross_modal_cooccurrence():
    rng = np.random.default_rng
    coupled = XrayECGReports("smoke", n_subjects=6000).plan(rng(0)).subjects
    apart = XrayECGReports("smoke", n_subjects=6000, coupling=0.0).plan(rng(0)).subjects
    assert _phi(coupled["cardiomegaly"], coupled["HYP"]) > 0.15
    assert abs(_phi(apart["cardiomegaly"], apart["HYP"])) < 0.04  # 3 SD of phi at n = 6000
    assert abs(_phi(apart["edema"], 1 - apart["NORM"])) < 0.04
    assert not apart["ecg_shares_conditions"].any() and coupled["ecg_shares_conditions"].all()
    # coupling moves the link, not the prevalence of any finding
    for f in (*XRAY_FINDINGS, *ECG_CLASSES):
        assert abs(coupled[f].mean() - apart[f].mean()) < 0.03


def test_prevalence_knob_and_bad_knobs():
    for prevalence in (0.3, 0.8):
        sub = XrayECGReports("smoke", n_subjects=6000, prevalence=prevalence).plan(np.random.default_rng(1)).subjects
        anyc = sub[[c for c in sub.columns if c.startswith("cond_")]].any(axis=1).mean()
        assert abs(anyc - prevalence) < 0.03
    with pytest.raises(ValueError, match="coupling"):
        XrayECGReports("smoke", coupling=1.5).plan(np.random.default_rng(0))
    with pytest.raises(ValueError, match="no field"):
        XrayECGReports("smoke", ecg_signl=0.0)


def test_ecg_figures_share_one_scale_on_square_paper(cohort):
    """The tour's normal and abnormal ECGs use one y range, and in mV a 0.2 s x 0.5 mV major
    square is as tall as it is wide on the page (a 25 mm/s, 10 mm/mV printout)."""
    import matplotlib.pyplot as plt

    from mmlib.cohorts.xray_ecg import ecg_figure, ecg_range, tour_figures

    figs = tour_figures(cohort)
    try:
        assert {"ecg_normal", "ecg_abnormal"} <= set(figs)
        ranges = {name: figs[name].axes[0].get_ylim() for name in ("ecg_normal", "ecg_abnormal")}
        assert ranges["ecg_normal"] == ranges["ecg_abnormal"]
        for name in ("ecg_normal", "ecg_abnormal"):
            fig = figs[name]
            fig.canvas.draw()
            ax = fig.axes[0]
            (x0, y0), (x1, y1) = ax.transData.transform([(0.0, 0.0), (0.2, 0.5)])
            assert abs((x1 - x0) - (y1 - y0)) < 0.02 * (x1 - x0), name
    finally:
        for fig in figs.values():
            plt.close(fig)
    # a preprocessed (unitless) ECG is not on paper: no fixed aspect; an explicit ylim is honoured
    sig = np.sin(np.linspace(0, 20, 400))[:, None].repeat(12, 1) * 3.2
    assert ecg_range(sig, 100.0) == (-3.5, 3.5)
    fig = ecg_figure(sig, 100.0, "x", units="scaled", ylim=(-4.0, 4.0))
    assert fig.axes[0].get_aspect() == "auto" and fig.axes[0].get_ylim() == (-4.0, 4.0)
    plt.close(fig)
