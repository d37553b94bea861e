"""The P5 glioma cohort: determinism, manifest, file formats and every planted effect (on and off)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmlib.cohorts import generator
from mmlib.cohorts.glioma import (
    GENE_GROUPS,
    GRADES,
    PROGRAMS,
    SUBTYPES,
    Glioma,
    gene_groups,
    nuclear_measures,
    planted_effect_checks,
    render_he_patch,
    tour_figures,
)
from mmlib.data import load_cohort

# effect cohorts: smoke bags and patches, but enough subjects for the 3-SE margins
EFFECT = {"n_subjects": 150, "png_per_subject": 4}
OFF = {"histology_signal": 0.0, "genomic_signal": 0.0, "survival_effect": 0.0}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return Glioma("smoke").generate(out_dir=tmp_path_factory.mktemp("smoke"), seed=0, workers=1, show_progress=False)


@pytest.fixture(scope="module")
def signal_on(tmp_path_factory):
    cohort = Glioma("smoke", **EFFECT).generate(out_dir=tmp_path_factory.mktemp("on"), seed=1, show_progress=False)
    return cohort, planted_effect_checks(cohort).set_index("effect")


@pytest.fixture(scope="module")
def signal_off(tmp_path_factory):
    gen = Glioma("smoke", **(EFFECT | {"n_subjects": 100}), **OFF)  # null: fewer subjects suffice
    cohort = gen.generate(out_dir=tmp_path_factory.mktemp("off"), seed=1, show_progress=False)
    return cohort, planted_effect_checks(cohort).set_index("effect")


def test_registry_and_knobs():
    assert isinstance(generator("glioma", "smoke"), Glioma)
    with pytest.raises(ValueError, match="no field"):
        Glioma("smoke", histology_sginal=0.0)
    with pytest.raises(ValueError, match="genes_per_group"):
        Glioma("smoke", genes_per_group=(3, 3)).plan(np.random.default_rng(0))


def test_manifest_validates_and_declares_the_layout(smoke):
    cohort = load_cohort(smoke.root)  # full validation: files, types, ranges, splits
    m = cohort.manifest
    assert len(cohort) == 30 and cohort.ids[0] == "sub-0001"
    assert m.labels == ["grade", "subtype"] and m.split_column == "fold" and m.site_column == "site"
    assert (m.survival.time, m.survival.event, m.survival.unit) == ("survival_months", "death", "months")
    assert list(cohort.subjects["grade"].cat.categories) == list(GRADES)
    assert set(cohort.subjects["subtype"]) <= set(SUBTYPES)
    assert (cohort.subjects["survival_months"] > 0).all() and set(cohort.subjects["death"]) == {0, 1}
    # observed table holds no latent; the truth holds the latents
    header = (smoke.root / "subjects.csv").read_text().splitlines()[0].split(",")
    assert not {"aggressiveness", "idh_mutant", "programs_file", "prop_necrosis"} & set(header)
    assert {"aggressiveness", "idh_mutant", "codeleted", "programs_file", "bag_frac_necrosis"} <= set(cohort.latents())
    # RNA: wide table, 6 groups x 6 genes, non-negative log2 values, group of each gene declared
    rna = cohort.tables["rna"]
    groups = gene_groups(cohort)
    assert len(rna) == 30 and rna.shape[1] == 1 + 36 and list(rna["subject_id"]) == cohort.ids
    assert groups.value_counts().to_dict() == {g: 6 for g in GENE_GROUPS}
    assert groups.to_dict() == cohort.truth["causal_model"]["rna"]["gene_groups"]
    assert (rna[groups.index].to_numpy(float) >= 0).all()


def test_bags_programs_and_pngs_agree(smoke):
    k = Glioma("smoke").knobs
    lat = smoke.latents().set_index("subject_id")
    for sid, n, feat, folder in zip(
        smoke.ids, smoke.subjects["n_patches"], smoke.paths("wsi_features"), smoke.paths("he_patches"), strict=True
    ):
        x = np.load(feat)
        assert x.dtype == np.float16 and x.shape == (n, k.feature_dim) and np.isfinite(x).all()
        assert k.bag_size_range[0] <= n <= k.bag_size_range[1]
        programs = np.load(smoke.root / lat.loc[sid, "programs_file"])
        assert programs.dtype == np.uint8 and programs.shape == (n,) and programs.max() < len(PROGRAMS)
        fracs = np.bincount(programs, minlength=len(PROGRAMS)) / n
        assert np.allclose(fracs, lat.loc[sid, [f"bag_frac_{p}" for p in PROGRAMS]].to_numpy(float), atol=1e-4)
        pngs = sorted(folder.glob("*.png"))
        assert len(pngs) == k.png_per_subject
        for p in pngs:
            assert int(p.stem[1:]) < n  # pNNNN.png renders bag row NNNN
            img = Image.open(p)
            assert img.mode == "RGB" and img.size == (k.png_size, k.png_size)
            assert np.asarray(img).dtype == np.uint8


def test_folds_stratified(signal_on):
    sub = signal_on[0].subjects
    table = pd.crosstab(sub["fold"], sub["grade"])
    assert sorted(sub["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (table > 0).all().all()  # every fold has every grade
    assert (table.max() - table.min() <= 2).all()  # and about the same number of each
    assert pd.crosstab(sub["fold"], sub["death"]).gt(0).all().all()
    assert sub["fold"].value_counts().max() - sub["fold"].value_counts().min() <= 1


def test_grade_subtype_coupling_and_survival_by_grade(signal_on):
    sub = signal_on[0].subjects
    gbm = sub["subtype"].str.startswith("glioblastoma")
    assert (gbm == (sub["grade"] == "IV")).all()  # grade IV is glioblastoma and nothing else is
    med = sub.groupby("grade", observed=True)["survival_months"].median()
    assert med["II"] > med["III"] > med["IV"]
    assert sub.loc[sub["grade"] == "IV", "death"].mean() > sub.loc[sub["grade"] == "II", "death"].mean()


def test_every_planted_effect_is_recovered(signal_on):
    checks = signal_on[1]
    assert list(checks.columns) == ["measure", "value", "chance", "margin", "present", "knob"]
    assert checks["present"].all(), checks
    v = checks["value"]
    assert v["slide features carry grade"] > 0.85
    assert v["slide features carry subtype"] > 0.75
    assert v["RNA gene groups carry grade"] > 0.85
    assert v["RNA gene groups carry subtype"] > 0.78
    assert v["necrosis + MVP planted in grade IV"] > 0.9
    assert v["nuclear density rises with grade"] > 0.45
    assert v["nuclear pleomorphism rises with grade"] > 0.45
    assert v["aggressiveness drives survival"] > 0.7
    assert v["grade stratifies survival"] > 0.65


def test_no_planted_effect_with_the_signals_off(signal_off):
    checks = signal_off[1]
    assert not checks["present"].any(), checks
    assert ((checks["value"] - checks["chance"]).abs() < np.maximum(checks["margin"], 0.15)).all(), checks


def test_nuclei_in_the_pngs_track_grade_and_necrosis_sits_in_grade_iv(signal_on, signal_off):
    for (cohort, _), rising in ((signal_on, True), (signal_off, False)):
        lat = cohort.latents().set_index("subject_id").loc[cohort.ids]
        grade = cohort.subjects["grade"].to_numpy()
        density, nuclei, necrosis = [], [], np.zeros(len(GRADES))
        for i, folder in enumerate(cohort.paths("he_patches")):
            stats = [nuclear_measures(np.asarray(Image.open(p))) for p in sorted(folder.glob("*.png"))]
            density.append(np.mean([f for f, _ in stats]))
            nuclei.append(np.mean([len(a) for _, a in stats]))
            programs = np.load(cohort.root / lat["programs_file"].iloc[i])
            necrosis[GRADES.index(grade[i])] += (programs == PROGRAMS.index("necrosis")).sum()
        by_grade = pd.Series(density).groupby(grade).mean()
        if rising:  # dark-blue nuclear pixels and necrosis follow grade
            assert by_grade["II"] < by_grade["III"] < by_grade["IV"]
            assert by_grade["IV"] > 2 * by_grade["II"]
            assert necrosis[2] / necrosis.sum() > 0.8
        else:
            assert by_grade.max() - by_grade.min() < 0.3 * by_grade.mean()
            assert necrosis[2] / necrosis.sum() < 0.75  # grade IV holds ~half the subjects
        assert np.mean(nuclei) > 3


def test_render_he_patch_morphology():
    def patch(program, seed=0, **kw):
        args = {"density": 1.0, "radius": 1.0, "cv": 1.0, "halo": False, "stain": (1.0, 1.0), "px": 96} | kw
        return render_he_patch(PROGRAMS.index(program), rng=np.random.default_rng(seed), **args)

    dense, sparse = patch("tumour_cellular", density=2.0), patch("tumour_cellular", density=0.5)
    assert dense.shape == (96, 96, 3) and dense.dtype == np.uint8
    assert nuclear_measures(dense)[0] > 2 * nuclear_measures(sparse)[0]
    assert nuclear_measures(patch("necrosis"))[0] < 0.02  # necrosis: no nuclei, only debris
    assert nuclear_measures(patch("normal_brain"))[0] < nuclear_measures(patch("tumour_cellular"))[0]
    # oligodendroglial halos clear the stroma around nuclei: more near-white pixels
    white = lambda img: (img.min(axis=2) > 225).mean()
    assert white(patch("tumour_cellular", halo=True)) > white(patch("tumour_cellular")) + 0.02
    # eosin-pink stroma: red and blue above green
    stroma = patch("normal_brain").reshape(-1, 3).astype(float).mean(axis=0)
    assert stroma[0] > stroma[1] and stroma[2] > stroma[1]
    assert np.array_equal(patch("inflammation", seed=3), patch("inflammation", seed=3))


def test_tour_figures(signal_on):
    import matplotlib.pyplot as plt

    figs = tour_figures(signal_on[0])
    assert set(figs) == {"histology_mosaic", "gene_group_heatmap", "tissue_programs_by_grade", "km_by_grade"}
    assert len(figs["histology_mosaic"].axes) == 3 * 8
    assert all(fig.get_size_inches()[0] >= 9 for fig in figs.values())
    km = figs["km_by_grade"].axes[0]
    assert km.get_xlabel() and km.get_ylabel() and len(km.get_legend().get_texts()) == 3
    for fig in figs.values():
        plt.close(fig)
