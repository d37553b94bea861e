"""P5 pipeline: data loading and its errors, survival bins, cross-validation on a planted cohort, scoring, claims."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmlib.pipelines import p5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(n: int = 90, seed: int = 0, d: int = 8, genes: int = 4) -> p5.P5Data:
    """A P5Data in memory: patches from 3 programs (distinct clusters); grade = which of programs 1/2
    dominates the bag; subtype is written in gene group 0; survival is shorter for high grade."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * 4
    grade = np.arange(n) % 3
    subtype = rng.integers(0, 2, n)
    bags, programs = [], []
    for i in range(n):
        m = int(rng.integers(5, 25))
        p = [0.8, 0.1, 0.1] if grade[i] == 0 else ([0.3, 0.6, 0.1] if grade[i] == 1 else [0.3, 0.1, 0.6])
        prog = rng.choice(3, m, p=p)
        bags.append(torch.tensor(centres[prog] + rng.normal(size=(m, d)), dtype=torch.float32))
        programs.append(prog.astype(np.uint8))
    rna = rng.normal(size=(n, 2 * genes)).astype(np.float32)
    rna[:, :genes] += 2.0 * subtype[:, None]
    t = rng.exponential(np.exp(-1.0 * grade)) * 10 + 0.1
    c = rng.uniform(0, 20, n)
    table = pd.DataFrame({"subject_id": [f"s{i:03d}" for i in range(n)], "grade": grade, "subtype": subtype,
                          "time": np.minimum(t, c), "event": (t <= c).astype(int), "fold": (np.arange(n) // 3) % 3,
                          "n_patches": [len(b) for b in bags]})
    return p5.P5Data(table=table, bags=bags, rna=rna, group_index=[list(range(genes)), list(range(genes, 2 * genes))],
                     group_names=["g0", "g1"], grade_names=["II", "III", "IV"], subtype_names=["a", "b"],
                     programs=programs, patch_rows=[np.arange(len(b)) for b in bags])


PROF = p5.PROFILES.get_profile("smoke", folds=None, dim=16, heads=2, epochs=12, batch_size=16, lr=3e-3, n_bins=3,
                               n_prototypes=3, ablation_prototypes=(), kmeans_patches=2000)


def test_survival_cuts_are_increasing_event_quantiles_covering_every_time():
    rng = np.random.default_rng(1)
    t = rng.exponential(10, 500)
    ev = rng.random(500) < 0.6
    cuts = p5.survival_cuts(t, ev, 4)
    assert len(cuts) == 5 and cuts[0] == 0 and cuts[-1] > t.max()
    assert np.all(np.diff(cuts) > 0)
    np.testing.assert_allclose(cuts[1:4], np.quantile(t[ev], [0.25, 0.5, 0.75]), rtol=1e-6)
    # tied quantiles (many equal event times) still give strictly increasing cuts
    tied = p5.survival_cuts(np.r_[np.full(50, 3.0), [1.0, 9.0]], np.ones(52, bool), 4)
    assert np.all(np.diff(tied) > 0)


def test_model_specs_have_unique_names_and_build_with_every_task_head():
    data = _planted(n=12)
    specs = p5.model_specs(p5.PROFILES["quick"])
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert names[0] == "UMEML" and set(p5.MODELS) <= set(names) and set(p5.ABLATIONS) <= set(names)
    assert {"UMEML K=1", "UMEML K=16"} <= set(names)
    batch = p5._batch(data, np.arange(3), torch.from_numpy(data.rna), torch.device("cpu"))
    for spec in p5.model_specs(PROF):
        model = p5.build_model(spec, data, PROF, {"grade": 3, "subtype": 2, "survival": 3}).eval()
        out = model(batch)
        assert {k: tuple(v.shape) for k, v in out["logits"].items()} == {"grade": (3, 3), "subtype": (3, 2),
                                                                         "survival": (3, 3)}, spec.name


@pytest.fixture(scope="module")
def planted_cv():
    data = _planted()
    specs = [s for s in p5.model_specs(PROF) if s.name in ("UMEML", "genomics only", "pathology only")]
    torch.set_num_threads(1)
    return data, p5.cross_validate(data, PROF, specs=specs, seed=0)


def test_cross_validation_predicts_every_subject_once_out_of_fold(planted_cv):
    data, cv = planted_cv
    for name, pred in cv.predictions.items():
        assert sorted(pred["subject"]) == sorted(data.table["subject_id"]), name
        fold_of = data.table.set_index("subject_id")["fold"]
        assert (fold_of.loc[pred["subject"]].to_numpy() == pred["fold"].to_numpy()).all()
        probs = pred[[c for c in pred.columns if c.startswith("p_grade_")]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert set(cv.history["model"]) == {"UMEML", "genomics only", "pathology only"}
    assert cv.history["loss modularity"].notna().any()  # UMEML trains with the modularity term
    assert cv.history.loc[cv.history["model"] == "genomics only", "loss modularity"].isna().all()


def test_planted_signals_are_recovered_by_the_modality_that_carries_them(planted_cv):
    data, cv = planted_cv
    m = p5.fold_metrics(cv, data).groupby("model").mean(numeric_only=True)
    # grade lives in the patches, subtype in the RNA: each single-modality model finds its own signal only
    assert m.loc["pathology only", "grade AUC"] > 0.85
    assert m.loc["genomics only", "subtype AUC"] > 0.85
    assert m.loc["genomics only", "grade AUC"] < 0.7
    assert m.loc["pathology only", "subtype AUC"] < 0.7
    assert m.loc["UMEML", "grade AUC"] > 0.8 and m.loc["UMEML", "subtype AUC"] > 0.8
    assert m.loc["UMEML", "survival c-index"] > 0.6  # survival follows grade


def test_cross_validation_is_deterministic_for_a_seed(planted_cv):
    data, cv = planted_cv
    spec = [s for s in cv.specs if s.name == "UMEML"]
    prof = PROF.replace(folds=(1,))
    again = p5.cross_validate(data, prof, specs=spec, seed=0)
    a = cv.predictions["UMEML"].query("fold == 1").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, again.predictions["UMEML"], check_exact=True)


def test_fit_runs_on_the_shared_loop_with_length_batches_and_a_per_step_cosine(monkeypatch):
    import math

    import mmlib.train

    data = _planted(n=40)
    train = np.arange(33)
    prof = PROF.replace(epochs=2, batch_size=8)
    seen = {}
    real_fit = mmlib.train.fit

    def spy(model, **kw):
        seen.update(kw)
        return real_fit(model, **kw)

    monkeypatch.setattr(mmlib.train, "fit", spy)
    rna, bins = torch.from_numpy(data.rna), torch.zeros(40, dtype=torch.long)
    spec = next(s for s in p5.model_specs(prof) if s.name == "UMEML")
    _, history = p5._fit(spec, data, train, prof, p5.TASKS, rna, bins, seed=4, device=torch.device("cpu"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "loss grade", "loss subtype", "loss survival", "loss modularity"}
    lengths = np.array([len(b) for b in data.bags])
    for epoch in range(2):  # the old loop's batches, in its order, each padded with its rows alongside
        batches = list(seen["train_batches"](epoch))
        want = list(p5.length_batches(train, lengths, 8, seed=4 * 1000 + epoch))
        assert [b["rows"].tolist() for b in batches] == [w.tolist() for w in want]
        for b in batches:
            assert b["patches"].shape[:2] == (len(b["rows"]), lengths[b["rows"]].max())
            assert (~b["patches_mask"]).sum(1).tolist() == lengths[b["rows"]].tolist()
    steps = 2 * 5  # ceil(33 / 8) batches per epoch
    f = seen["step_lr_factor"]
    cosine = [0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    assert [f(k) for k in range(steps)] == pytest.approx(cosine)
    assert seen.get("lr_factor") is None and seen["epochs"] == 2


def test_prototype_recovery_scores_assignments_against_the_true_programs(planted_cv):
    data, cv = planted_cv
    rec = p5.prototype_recovery(cv, data, PROF).set_index("method")
    # k-means on well-separated clusters finds them; k-means with the true K is almost perfect
    assert rec.loc["k-means, K=3 (raw features)", "ARI"] > 0.9
    assert set(rec.index) >= {"UMEML", "pathology only"}
    # a shuffled assignment scores about zero
    shuffled = {k: [np.random.default_rng(0).permutation(a) for a in v] for k, v in cv.assignments.items()}
    cv2 = p5.CVResult(cv.specs, cv.predictions, cv.history, shuffled, cv.decoder, cv.cuts)
    rec2 = p5.prototype_recovery(cv2, data, PROF).set_index("method")
    assert abs(rec2.loc["UMEML", "ARI"]) < 0.1


def test_gene_group_attention_is_a_share_over_groups(planted_cv):
    data, cv = planted_cv
    att = p5.gene_group_attention(cv, data)
    assert sorted(att["group"]) == ["g0", "g1"]
    assert att["attention share"].sum() == pytest.approx(1.0)
    assert "spearman" not in att.attrs  # no truth card: nothing to rank against


def test_figures_count_whole_epochs_and_name_gene_groups_in_full(planted_cv):
    import dataclasses

    import matplotlib.pyplot as plt

    data, cv = planted_cv
    fig = p5.training_figure(cv.history)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)
    long = dataclasses.replace(data, group_names=["cellular_differentiation", "tumour_suppression"])
    fig = p5.attention_figure(cv, long)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[-2:] == ["cellular\ndifferentiation", "tumour\nsuppression"]  # wrapped, not cut
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels
    plt.close(fig)


def test_paired_differences_and_claims_on_a_known_table():
    rows = []
    for fold in range(5):
        for model, shift in (("UMEML", 0.0), ("pathology only", -0.1), ("UMEML w/o register tokens", 0.02)):
            rows.append({"model": model, "group": "ablation" if "w/o" in model else "comparison", "fold": fold,
                         **{k: 0.7 + shift + 0.01 * fold for k in p5.METRICS}})
    per_fold = pd.DataFrame(rows)
    per_fold.loc[(per_fold["model"] == "pathology only") & (per_fold["fold"] == 0), "grade AUC"] += 0.05
    d = p5.paired_differences(per_fold).set_index(["model", "metric"])
    assert d.loc[("pathology only", "grade AUC"), "UMEML minus model"] == pytest.approx(0.09)
    assert d.loc[("pathology only", "survival c-index"), "shown (mean - 2 se > 0)"]
    assert d.loc[("UMEML w/o register tokens", "grade AUC"), "folds UMEML ahead"] == 0
    claims = p5.claims_table(per_fold, d.reset_index(), None, None).set_index("claim")
    assert claims.loc["UMEML beats the single-modality baselines", "held"] == "yes"
    assert claims.loc["the register tokens help", "held"] == "no"
    table = p5.comparison_table(per_fold)
    assert list(table["model"]) == ["UMEML", "pathology only"]
    assert table.loc[0, "grade AUC"] == "0.720 ± 0.016"
    pvr = p5.paper_vs_run(per_fold).set_index("quantity")
    assert pvr.loc["grading AUC", "this run"] == "72.00% ± 1.58"  # percent, as the paper prints it
    assert pvr.loc["grading AUC", "paper reported"] == "92.12%"


@pytest.fixture(scope="module")
def smoke_cohort(tmp_path_factory):
    from mmlib.cohorts import open_cohort

    return open_cohort("glioma", tmp_path_factory.mktemp("data"), "smoke", 0, show_progress=False)


def test_load_data_reads_bags_rna_groups_and_programs(smoke_cohort):
    prof = p5.PROFILES["smoke"].replace(max_patches=25)
    data = p5.load_data(smoke_cohort, prof)
    n = len(smoke_cohort.subjects)
    assert len(data.bags) == n == len(data.table) == data.rna.shape[0]
    assert sorted(i for g in data.group_index for i in g) == list(range(data.rna.shape[1]))
    assert len(data.group_names) == 6
    for b, p, rows in zip(data.bags, data.programs, data.patch_rows):
        assert len(b) == len(p) == len(rows) <= 25
    # the kept rows are the same rows of the bag file and of the programs file
    lat = smoke_cohort.latents().set_index("subject_id")
    sid = data.table["subject_id"].iloc[0]
    full = np.load(smoke_cohort.root / "features" / f"{sid}.npy").astype(np.float32)
    np.testing.assert_array_equal(data.bags[0].numpy(), full[data.patch_rows[0]])
    progs = np.load(smoke_cohort.root / lat.loc[sid, "programs_file"])
    np.testing.assert_array_equal(data.programs[0], progs[data.patch_rows[0]])
    assert set(data.table["fold"]) == set(range(5))


def test_load_data_names_the_bad_file_or_column(smoke_cohort, tmp_path):
    import shutil

    from mmlib.data import load_cohort

    root = tmp_path / "c"
    shutil.copytree(smoke_cohort.root, root)
    sid = smoke_cohort.subjects["subject_id"].iloc[2]
    bag = np.load(root / "features" / f"{sid}.npy")
    bag[3, 1] = np.nan
    np.save(root / "features" / f"{sid}.npy", bag)
    cohort = load_cohort(root)
    with pytest.raises(ValueError, match=rf"{sid}\.npy: non-finite patch features in row\(s\) \[3\]"):
        p5.load_data(cohort, p5.PROFILES["smoke"])
    cohort.subjects = cohort.subjects.drop(columns=["subtype"])
    with pytest.raises(ValueError, match="no subtype column"):
        p5.load_data(cohort, p5.PROFILES["smoke"])


def test_ceiling_uses_the_planted_aggressiveness(smoke_cohort):
    data = p5.load_data(smoke_cohort, p5.PROFILES["smoke"])
    tab = p5.ceiling_table(data).set_index("reference")
    from mmlib.metrics import concordance_index

    agg = data.latents["aggressiveness"].to_numpy(float)
    vals = []
    for fold in data.folds:
        _, test = data.split(fold)
        ev, tm = data.survival(test)
        vals.append(concordance_index(ev, tm, agg[test]))
    assert tab.loc["planted aggressiveness (survival ceiling)", "survival c-index"] == \
        f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"
    assert (data.latents["subject_id"] == data.table["subject_id"]).all()
    data.latents = None
    assert p5.ceiling_table(data) is None
