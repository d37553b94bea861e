"""P4's fusion strategies on the real breast-cancer data of scikit-survival (mmlib.pipelines.p4_breast)."""

from __future__ import annotations

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from mmlib.pipelines import p4_breast as pb

SMALL = dict(n_folds=3, epochs=20, strategies=["clinical only", "co-attention"], baselines=True, seed=0)
CLINICAL_NAMES = ["age", "size", "er_positive", "grade_intermediate", "grade_poorly_differentiated", "grade_unknown"]


@pytest.fixture(scope="module")
def data() -> pb.BreastData:
    return pb.load_breast_cancer_modalities()


@pytest.fixture(scope="module")
def small(data) -> pb.BreastResult:
    return pb.breast_cancer_benchmark(**SMALL)


# --------------------------------------------------------------------------- data and tokens


def test_loader_matches_scikit_survival(data):
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    assert data.n == 198
    assert data.genes.shape == (198, 76) and data.genes.dtype == np.float32
    assert data.clinical.shape == (198, len(CLINICAL_NAMES)) and data.clinical.dtype == np.float32
    assert data.clinical_names == CLINICAL_NAMES
    assert len(data.gene_names) == 76 and not set(data.gene_names) & {"age", "er", "grade", "size"}
    assert int(data.event.sum()) == int(y["e.tdm"].sum()) == 51
    assert data.event.dtype == bool
    np.testing.assert_array_equal(data.time, y["t.tdm"])  # days, as shipped
    assert not np.isnan(data.genes).any() and not np.isnan(data.clinical).any()
    np.testing.assert_allclose(data.genes, X[data.gene_names].to_numpy(), rtol=1e-6)
    clin = pd.DataFrame(data.clinical, columns=CLINICAL_NAMES)
    np.testing.assert_allclose(clin["age"], X["age"], rtol=1e-6)
    np.testing.assert_allclose(clin["size"], X["size"], rtol=1e-6)
    np.testing.assert_array_equal(clin["er_positive"], (X["er"] == "positive").astype(float))
    grade = clin[CLINICAL_NAMES[3:]]
    assert set(np.unique(grade)) == {0.0, 1.0} and (grade.sum(axis=1) <= 1).all()
    # reference level "well differentiated" = all three indicators zero
    np.testing.assert_array_equal(grade.sum(axis=1) == 0, X["grade"].astype(str) == "well differentiated")
    np.testing.assert_array_equal(clin["grade_unknown"], (X["grade"].astype(str) == "unkown").astype(float))


def test_feature_tokens_are_value_times_unit_vector():
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    tok = pb.feature_tokens(x)
    assert tok.shape == (5, 7, 7)
    lin = torch.nn.Linear(7, 4)
    out = lin(tok)  # (5, 7, 4)
    expected = x[:, :, None] * lin.weight.T[None, :, :] + lin.bias  # value_f * W[:, f] + b
    torch.testing.assert_close(out, expected)
    assert torch.equal(tok.sum(dim=2), x) and torch.count_nonzero(tok) == torch.count_nonzero(x)
    with pytest.raises(ValueError, match="x must be"):
        pb.feature_tokens(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="x must be"):
        pb.feature_tokens(torch.ones(2, 3, dtype=torch.long))


def test_standardize_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(40, 3))
    train[:, 2] = 1.0  # constant in training: centred, not scaled
    test = rng.normal(3.0, 2.0, size=(10, 3))
    z_train, z_test = pb.standardize(train, test)
    shifted = test.copy()
    shifted[0] += 1e6
    z_train2, z_test2 = pb.standardize(train, shifted)
    np.testing.assert_array_equal(z_train, z_train2)
    np.testing.assert_array_equal(z_test[1:], z_test2[1:])
    mean, sd = train.mean(axis=0), train.std(axis=0)
    np.testing.assert_allclose(z_train[:, :2], (train[:, :2] - mean[:2]) / sd[:2], rtol=1e-5)
    np.testing.assert_allclose(z_test[:, :2], (test[:, :2] - mean[:2]) / sd[:2], rtol=1e-5)
    np.testing.assert_allclose(z_test[:, 2], test[:, 2] - 1.0, rtol=1e-5)
    assert np.isfinite(z_train).all() and (z_train[:, 2] == 0).all()


def test_strategies_build_and_score_tokens(data):
    assert list(pb.STRATEGIES) == ["genes only", "clinical only", "late fusion", "contrastive",
                                   "cross-attention genes->clinical", "cross-attention clinical->genes",
                                   "co-attention", "co-attention clinical-guided"]
    dims = {"genes": 76, "clinical": 6}
    batch = {"genes": pb.feature_tokens(torch.randn(4, 76)), "clinical": pb.feature_tokens(torch.randn(4, 6))}
    for name, build in pb.STRATEGIES.items():
        model = build(dims, **pb.ARCH).eval()
        assert model(batch)["risk"].shape == (4,), name
    guided = pb.STRATEGIES["co-attention clinical-guided"](dims, **pb.ARCH)
    assert guided.guided_by == "clinical" and set(guided.attends_to) == {"genes"}
    assert pb.STRATEGIES["cross-attention clinical->genes"](dims, **pb.ARCH).query == "clinical"


# --------------------------------------------------------------------------- benchmark mechanics


def test_folds_partition_and_are_shared_by_every_model(small, data):
    folds = small.folds
    assert len(folds) == 3
    allidx = np.concatenate(folds)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(data.n))  # each subject in exactly one test fold
    for f in folds:  # stratified on the event
        assert abs(data.event[f].mean() - data.event.mean()) < 0.03
    models = ["clinical only", "co-attention", *pb.BASELINES]
    assert sorted(small.per_fold["model"].unique()) == sorted(models)
    assert len(small.per_fold) == len(models) * 3
    for (model, fold), grp in small.risks.groupby(["model", "fold"]):
        np.testing.assert_array_equal(np.sort(grp["subject"].to_numpy()), np.sort(folds[fold]), err_msg=model)
    pf = small.per_fold.set_index(["model", "fold"])
    for model in models:
        for k, f in enumerate(folds):
            assert pf.loc[(model, k), "n_test"] == len(f) and pf.loc[(model, k), "n_events"] == data.event[f].sum()
    fam = dict(zip(small.per_fold["model"], small.per_fold["family"]))
    assert fam["clinical only"] == "neural unimodal" and fam["co-attention"] == "neural fusion"
    assert all(fam[b] == "scikit-survival" for b in pb.BASELINES)


def test_repeats_partition_each_repeat(data):
    res = pb.breast_cancer_benchmark(n_folds=4, n_repeats=2, strategies=(), baselines=["CoxPH ridge (clinical)"])
    assert len(res.folds) == 8
    for r in range(2):
        np.testing.assert_array_equal(np.sort(np.concatenate(res.folds[4 * r:4 * r + 4])), np.arange(data.n))
    assert not all(np.array_equal(a, b) for a, b in zip(res.folds[:4], res.folds[4:]))  # reshuffled
    assert sorted(res.per_fold[["repeat", "fold"]].itertuples(index=False)) == [(r, f) for r in range(2)
                                                                                 for f in range(4)]


def test_test_fold_values_never_reach_training(small, data):
    """A huge value in one test subject leaves every other test subject's score unchanged (all models)."""
    target = int(small.folds[0][0])
    shifted = data.subset(np.arange(data.n))
    shifted.genes[target] += 1000.0
    shifted.clinical[target, 0] += 1000.0
    other = pb.breast_cancer_benchmark(**SMALL, data=shifted)
    np.testing.assert_array_equal(other.folds[0], small.folds[0])
    a = small.risks[small.risks["fold"] == 0].set_index(["model", "subject"])["risk"]
    b = other.risks[other.risks["fold"] == 0].set_index(["model", "subject"])["risk"]
    rest = a.index.get_level_values("subject") != target
    pd.testing.assert_series_equal(a[rest], b.loc[a.index[rest]], check_exact=True)
    # the perturbation did reach the models' inputs: the shifted subject's own score moved somewhere
    assert (a[~rest] != b.loc[a.index[~rest]]).any()


def test_same_seed_same_table(small):
    torch.manual_seed(12345)  # a different global RNG state than the fixture's run saw: must not matter
    torch.rand(3)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(2)  # the run uses one thread and must put the caller's setting back
    try:
        again = pb.breast_cancer_benchmark(**SMALL)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(small.per_fold, again.per_fold, check_exact=True)
    pd.testing.assert_frame_equal(small.risks, again.risks, check_exact=True)
    # the caller's torch state is left alone
    assert torch.equal(torch.get_rng_state(), state)


def test_summary_paired_differences(small):
    s = small.summary.set_index("model")
    wide = small.per_fold.pivot(index=["repeat", "fold"], columns="model", values="c_index")
    assert (s["reference"] == "clinical only").all()  # the only unimodal model run
    np.testing.assert_allclose(s["mean_c"], wide.mean()[s.index])
    np.testing.assert_allclose(s["sd_c"], wide.std(ddof=1)[s.index])
    diff = wide.sub(wide["clinical only"], axis=0)
    np.testing.assert_allclose(s["mean_diff"], diff.mean()[s.index], atol=1e-12)
    np.testing.assert_allclose(s["sd_diff"], diff.std(ddof=1)[s.index], atol=1e-12)
    assert list(s["wins"]) == [int((diff[m] > 0).sum()) for m in s.index]
    assert s.loc["clinical only", "mean_diff"] == 0 and s.loc["clinical only", "wins"] == 0
    assert list(small.summary["mean_c"]) == sorted(small.summary["mean_c"], reverse=True)
    assert (s["n_folds"] == 3).all()


def test_best_unimodal_is_the_reference(small):
    fake = small.per_fold.copy()
    fake = pd.concat([fake, fake[fake["model"] == "clinical only"].assign(model="genes only", c_index=0.99)])
    summary = pb._summarise(fake, ["genes only", "clinical only", "co-attention"])
    assert (summary["reference"] == "genes only").all()


def test_figure(small):
    fig = pb.breast_figure(small)
    ax = fig.axes[0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert any(np.allclose(ln.get_xdata(), 0.5) for ln in dashed)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(small.summary["model"])
    plt.close(fig)


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategies"):
        pb.breast_cancer_benchmark(strategies=["early fusion"])
    with pytest.raises(ValueError, match="baselines"):
        pb.breast_cancer_benchmark(strategies=(), baselines=["DeepSurv"])
    with pytest.raises(ValueError, match="n_folds"):
        pb.breast_cancer_benchmark(n_folds=1)
    with pytest.raises(ValueError, match="arch"):
        pb.breast_cancer_benchmark(arch={"width": 8})
    with pytest.raises(ValueError, match="nothing to run"):
        pb.breast_cancer_benchmark(strategies=(), baselines=False)


# --------------------------------------------------------------------------- signal and negative control


def test_cox_baselines_find_the_known_signal():
    res = pb.breast_cancer_benchmark(strategies=(), baselines=["CoxPH ridge (clinical)", "Coxnet (genes + clinical)"],
                                     n_repeats=2)
    means = res.summary.set_index("model")["mean_c"]
    assert means["CoxPH ridge (clinical)"] > 0.55
    assert means["Coxnet (genes + clinical)"] > 0.55


def test_neural_models_beat_chance_on_real_labels(small):
    neural = small.per_fold[small.per_fold["family"] != "scikit-survival"]
    assert neural["c_index"].mean() > 0.53  # about 0.64 at seed 0; 0.57-0.63 at seeds 1-5


def test_permuted_outcomes_give_chance(data):
    """Negative control: (time, event) permuted jointly across subjects; averaged over 4 permutations
    (a single permutation's 5-fold mean c-index varies by about +-0.07 around 0.5)."""
    means = []
    for s in range(4):
        p = np.random.default_rng(100 + s).permutation(data.n)
        permuted = dataclasses.replace(data, time=data.time[p], event=data.event[p])
        res = pb.breast_cancer_benchmark(strategies=["clinical only"], baselines=False, data=permuted, seed=s)
        means.append(res.summary["mean_c"].iloc[0])
    assert abs(np.mean(means) - 0.5) < 0.1, means


def test_late_fusion_combines_the_folds_trained_unimodal_models():
    res = pb.breast_cancer_benchmark(n_folds=3, epochs=15, strategies=["late fusion"], baselines=False, seed=0)
    assert list(dict.fromkeys(res.per_fold["model"])) == ["genes only", "clinical only", "late fusion"]
    wide = res.risks.pivot_table(index=["repeat", "fold", "subject"], columns="model", values="risk")
    for _, fold in wide.groupby(level=["repeat", "fold"]):
        design = np.column_stack([np.ones(len(fold)), fold["genes only"], fold["clinical only"]])
        coef, *_ = np.linalg.lstsq(design, fold["late fusion"].to_numpy(), rcond=None)
        assert np.abs(design @ coef - fold["late fusion"].to_numpy()).max() < 1e-5
