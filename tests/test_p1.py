"""P1 pipeline pieces that the notebook's smoke run does not pin down by value."""

import dataclasses
import types

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mmlib.data.manifest import Column, Manifest
from mmlib.pipelines import p1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cohort(**override):
    cols = [Column(name="age", dtype="float"), Column(name="sex", dtype="category", categories=["female", "male"]),
            Column(name="diabetes", dtype="bool", nullable=True), Column(name="sbp", dtype="float", nullable=True),
            Column(name="split", dtype="category", categories=["pretrain", "train", "val", "test"]),
            Column(name="stroke", dtype="int", nullable=True)]
    m = Manifest(name="toy", columns=cols, labels=["stroke"], split_column="split")
    t = pd.DataFrame({"subject_id": ["a", "b", "c", "d"], "age": [50.0, 60.0, 70.0, 100.0],
                      "sex": ["male", "female", None, "male"], "diabetes": [True, None, False, True],
                      "sbp": [120.0, np.nan, 140.0, 200.0], "split": ["pretrain", "train", "train", "test"],
                      "stroke": [np.nan, 0, 1, 1]})
    t = t.assign(**override)
    return types.SimpleNamespace(manifest=m, subjects=t, root="/toy", name="toy")


def test_encode_table_codes_missing_and_scales_on_the_fit_rows_only():
    cat, cont, levels, fields = p1.encode_table(_cohort(), fit_rows=np.array([0, 1, 2]))
    assert fields == {"categorical": ["sex", "diabetes"], "continuous": ["age", "sbp"]}  # no label, no split
    assert levels == [2, 2]
    np.testing.assert_array_equal(cat.numpy(), [[1, 1], [0, -1], [-1, 0], [1, 1]])
    age = np.array([50.0, 60.0, 70.0])  # the test row (100) does not move the scaling
    np.testing.assert_allclose(cont[:, 0].numpy(), (np.array([50, 60, 70, 100]) - age.mean()) / age.std(), rtol=1e-6)
    assert torch.isnan(cont[1, 1]) and not torch.isnan(cont[[0, 2, 3], 1]).any()


def test_encode_table_names_undeclared_categories():
    with pytest.raises(ValueError, match=r"column 'sex': values \['x'\]"):
        p1.encode_table(_cohort(sex=["male", "x", "female", "male"]), fit_rows=np.array([0]))


def _data(n=12, prof=p1.PROFILES["smoke"]):
    g = torch.Generator().manual_seed(0)
    split = (["pretrain"] * 4 + ["train"] * 4 + ["val"] * 2 + ["test"] * 2)[:n]
    label = [np.nan] * 4 + [0, 1] * 4
    return p1.P1Data(table=pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "split": split, "label": label[:n]}),
                     images=torch.rand(n, 1, *prof.spatial_size, generator=g).half(),
                     categorical=torch.randint(-1, 3, (n, 2), generator=g), continuous=torch.randn(n, 3, generator=g),
                     n_categories=[3, 3], fields={"categorical": ["a", "b"], "continuous": ["c", "d", "e"]},
                     truth=None, spacing_mm=prof.spacing_mm)


@pytest.mark.parametrize("heads", ["image", "tabular", "concat", "image+tabular", "ensemble"])
def test_classifier_heads_use_exactly_their_modalities(heads):
    prof = p1.PROFILES["smoke"]
    data = _data()
    torch.manual_seed(0)
    model = p1.P1Classifier(p1.build_clip(data, prof), heads).eval()
    b = data.batch([0, 1, 2])
    with torch.no_grad():
        ref = model(b)["logits"]
        new_image = model(dict(b, image=torch.rand_like(b["image"])))["logits"]
        new_table = model(dict(b, continuous=b["continuous"] + 3.0))["logits"]
    assert ref.shape == (3, 2)
    assert torch.allclose(ref, new_image) == (heads == "tabular")
    assert torch.allclose(ref, new_table) == (heads == "image")


@pytest.mark.parametrize("objective,trained,untouched", [
    ("simclr", "image_encoder", "tabular_encoder"),
    ("scarf", "tabular_encoder", "image_encoder"),
    ("clip", "image_encoder", "interaction"),
    ("clip_itm", "interaction", None),
    ("clip_itm_random", "interaction", None),
])
def test_each_objective_trains_what_it_should(objective, trained, untouched):
    prof = p1.PROFILES["smoke"]
    data = _data()
    torch.manual_seed(0)
    corr = p1.TabularCorruption(0.3).fit(data.categorical, data.continuous)
    model = p1.Pretrainer(p1.build_clip(data, prof), objective, prof, corr).train()
    out = model(data.batch(range(8)))
    assert torch.isfinite(out["loss"])
    if objective.startswith("clip_itm"):
        assert out["loss"].item() == pytest.approx(0.5 * (out["itc"] + out["itm"]).item(), rel=1e-6)
    out["loss"].backward()

    def has_grad(prefix):
        ps = [p for n, p in model.clip.named_parameters() if n.startswith(prefix)]
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)

    assert has_grad(trained)
    if untouched:
        assert not has_grad(untouched)


def _fake_ft(aucs, bas):
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    evals = {}
    for m in p1.ALL_METHODS:
        p = np.clip(y * aucs[m] + rng.uniform(0, 1, 20) * 0.5, 0, 1)
        evals[m] = {"test AUC": (aucs[m], aucs[m] - 0.1, aucs[m] + 0.1),
                    "test balanced accuracy": (bas[m], bas[m] - 0.1, bas[m] + 0.1),
                    "threshold": 0.5, "p_test": p, "y_test": y, "val AUC": 0.7}
    return p1.FineTuned(models={}, history=pd.DataFrame(), evals=evals)


def test_relative_gains_use_the_best_baseline_of_each_group():
    aucs = dict.fromkeys(p1.ALL_METHODS, 0.6) | {"SimCLR image": 0.70, "SCARF tabular": 0.75, p1.PAPER: 0.80}
    bas = dict.fromkeys(p1.ALL_METHODS, 0.6) | {"SCARF tabular": 0.50, "supervised multimodal (concat)": 0.64,
                                                p1.PAPER: 0.72}
    rows = p1.relative_gains(_fake_ft(aucs, bas))
    auc_row = rows[(rows["metric"] == "ROC-AUC")].iloc[0]
    assert auc_row["this run gain %"] == pytest.approx(100 * (0.80 - 0.75) / 0.75, abs=0.05)
    assert auc_row["baseline in this run"].startswith("SCARF tabular")
    ba_ssl, ba_sup = rows[rows["metric"] == "balanced accuracy"].iloc[0], rows[rows["metric"] == "balanced accuracy"].iloc[1]
    assert ba_ssl["baseline in this run"].startswith("SimCLR image")  # 0.6 beats SCARF's 0.5
    assert ba_ssl["this run gain %"] == pytest.approx(20.0, abs=0.05)
    assert ba_sup["this run gain %"] == pytest.approx(100 * (0.72 - 0.64) / 0.64, abs=0.05)
    assert list(rows["paper reported gain %"]) == [2.1, 10.6, 7.6]


def _ft_from_predictions(strong: set[str], weak_lead: str | None = None):
    """Test-set predictions per method: ``strong`` methods separate the classes, the rest are noise;
    ``weak_lead`` gets the noise predictions with its lowest-scored positive raised to the top (a small AUC lead)."""
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    noise = rng.uniform(0, 1, y.size)
    evals = {}
    for m in p1.ALL_METHODS:
        p = (y + 0.9 * rng.uniform(0, 1, y.size)) / 2 if m in strong else noise.copy()
        thr = 0.48 if m in strong else 0.5
        if m == weak_lead:
            first_pos = int(np.flatnonzero(y == 1)[np.argmin(noise[y == 1])])
            p[first_pos] = 1.0
        auc = roc_auc_score(y, p)
        evals[m] = {"test AUC": (auc, auc - 0.1, auc + 0.1), "test balanced accuracy": (0.5, 0.4, 0.6),
                    "threshold": thr, "p_test": p, "y_test": y, "val AUC": 0.7}
    return p1.FineTuned(models={}, history=pd.DataFrame(), evals=evals)


def test_claims_hold_only_when_the_paired_interval_clears_zero():
    prof = p1.PROFILES["smoke"]
    auc_ssl = "CLIP + ITM beats the best self-supervised unimodal model in ROC-AUC"
    ba_sup = "CLIP + ITM beats the best supervised multimodal model in balanced accuracy"
    align = "ITM improves image-table alignment (test retrieval: mean rank of a subject's own table)"
    hard = "hard ITM negatives beat random ones (test ROC-AUC)"
    retrieval = pd.DataFrame({"model": [p1.PAPER, "MMCL (CLIP, no ITM)"], "image→table mean rank": [3.0, 7.5],
                              "chance mean rank": [10.5, 10.5], "permutation p": [0.01, 0.04]})
    # the paper's model separates the classes, every other model guesses: every claim holds
    held = p1.claims_table(_ft_from_predictions({p1.PAPER}), retrieval, prof).set_index("claim")["held"]
    assert held[auc_ssl] == "yes" and held[ba_sup] == "yes" and held[hard] == "yes"
    # no per-subject ranks: a lower mean rank without an interval is only "partly"
    assert held[align].startswith("partly")
    ranks = {p1.PAPER: np.arange(1.0, 21.0) % 5 + 1, "MMCL (CLIP, no ITM)": np.arange(1.0, 21.0) % 5 + 6}
    retrieval.attrs["ranks"] = ranks
    held = p1.claims_table(_ft_from_predictions({p1.PAPER}), retrieval, prof).set_index("claim")["held"]
    assert held[align] == "yes"
    # the reverse: every baseline separates, the paper's model guesses
    others = set(p1.ALL_METHODS) - {p1.PAPER}
    retrieval.attrs["ranks"] = {p1.PAPER: ranks["MMCL (CLIP, no ITM)"], "MMCL (CLIP, no ITM)": ranks[p1.PAPER]}
    held = p1.claims_table(_ft_from_predictions(others), retrieval, prof).set_index("claim")["held"]
    assert (held == "no").all(), held
    # one positive moved up: ahead on the estimate, not established by the data
    claims = p1.claims_table(_ft_from_predictions(set(), weak_lead=p1.PAPER), retrieval, prof).set_index("claim")
    assert claims.loc[hard, "held"].startswith("partly"), claims.loc[hard, "this run"]
    assert claims.loc[auc_ssl, "held"].startswith("partly")


def test_rank_test_separates_aligned_from_shuffled_embeddings():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 8))
    aligned = p1._rank_test(z @ (z + 0.3 * rng.normal(size=z.shape)).T)
    assert aligned["image→table mean rank"] < 2 and aligned["permutation p"] < 0.01
    assert aligned["chance mean rank"] == 15.5
    ps = [p1._rank_test(z @ rng.normal(size=z.shape).T, n_perm=200, seed=s)["permutation p"] for s in range(20)]
    assert 0.2 < np.mean(ps) < 0.8  # unrelated embeddings: p roughly uniform


def test_itm_check_compares_with_always_mismatch():
    h = pd.DataFrame({"objective": ["clip", "clip_itm", "clip_itm", "clip_itm_random", "clip_itm_random"],
                      "epoch": [0, 0, 1, 0, 1], "val_itm_accuracy": [np.nan, 0.9, 2 / 3, 0.6, 0.8]})
    out = p1.itm_check(h).set_index("objective")
    assert list(out.index) == ["clip_itm", "clip_itm_random"]  # last epoch of each ITM objective
    assert out.loc["clip_itm", "learnt to tell pairs apart"] == "no"  # 2/3 at the end: constant "mismatch"
    assert out.loc["clip_itm_random", "learnt to tell pairs apart"] == "yes"


def _score_rows(method, weights, m, ratios, above):
    return [{"method": method, "weights": weights, "map": m, "truth": "lesions in the outcome region",
             "subject_id": f"sub-{i}", "mass_inside": 0.5 if a else 0.01, "chance_mean": 0.1, "chance_p95": 0.2,
             "ratio": r, "region_fraction": 0.1, "pointing_game": False, "rank_percentile": 50.0}
            for i, (r, a) in enumerate(zip(ratios, above))]


def test_localisation_summary_needs_both_the_shuffled_map_and_the_untrained_network():
    rows = []
    # saliency: above random in 3 of 4 cases and above the untrained network in 3 of 4 -> evidence
    rows += _score_rows(p1.PAPER, "trained", "gradient saliency", [2.0, 2.5, 3.0, 0.9], [True, True, True, False])
    rows += _score_rows(p1.PAPER, "untrained", "gradient saliency", [1.2, 1.3, 1.1, 1.5], [False] * 4)
    # guided Grad-CAM: above random everywhere, but the untrained network does as well -> no evidence
    rows += _score_rows(p1.PAPER, "trained", "Guided Grad-CAM", [4.0, 5.0, 3.0, 4.0], [True] * 4)
    rows += _score_rows(p1.PAPER, "untrained", "Guided Grad-CAM", [4.5, 5.5, 3.5, 3.0], [True] * 4)
    # Grad-CAM: beats its untrained network, but not the shuffled map -> no evidence
    rows += _score_rows(p1.PAPER, "trained", "Grad-CAM", [1.1, 1.2, 0.9, 1.0], [False, True, False, False])
    rows += _score_rows(p1.PAPER, "untrained", "Grad-CAM", [0.8, 0.9, 0.7, 0.6], [False] * 4)
    s = p1.localisation_summary(pd.DataFrame(rows)).set_index("map")
    assert list(s.index) == ["Grad-CAM", "Guided Grad-CAM", "gradient saliency"]  # ATTRIBUTION_MAPS order
    assert s.loc["gradient saliency", "verdict"] == "yes"
    assert s.loc["Guided Grad-CAM", "verdict"] == "no"
    assert s.loc["Grad-CAM", "verdict"] == "no"
    assert s.loc["gradient saliency", "above_random_p95"] == pytest.approx(0.75)
    assert s.loc["gradient saliency", "beats_untrained"] == pytest.approx(0.75)
    assert s.loc["Guided Grad-CAM", "untrained_ratio"] == pytest.approx(4.125)
    text = p1.localisation_verdict(s.reset_index())
    assert "are gradient saliency." in text and "Guided Grad-CAM: 4.00x" in text
    vt = next(v for v in p1.VERDICT_TABLES if v.table == "gradcam_localisation_summary")  # make replicate reads these
    assert {*vt.key, vt.verdict, vt.value} <= set(s.reset_index().columns)


def test_localisation_summary_counts_an_empty_map_as_no_mass():
    """localisation_scores gives NaN for a map with no mass at all; the summary counts it as 0 on the lesions."""
    rows = _score_rows(p1.PAPER, "trained", "Grad-CAM", [2.0, 2.0], [True, True])
    rows += _score_rows(p1.PAPER, "untrained", "Grad-CAM", [np.nan, 3.0], [False, True])
    rows[2]["mass_inside"] = np.nan
    s = p1.localisation_summary(pd.DataFrame(rows)).iloc[0]
    assert s["untrained_ratio"] == pytest.approx(1.5)  # (0 + 3) / 2, not 3
    assert s["beats_untrained"] == pytest.approx(0.5)
    assert s["untrained_above_p95"] == pytest.approx(0.5)


class _NegatedStroke(torch.nn.Module):
    """The same network with the stroke logit negated: Grad-CAM's channel weights flip sign."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.clip = inner, inner.clip

    def forward(self, batch):
        logits = self.inner(batch)["logits"]
        return {"logits": torch.stack([logits[:, 0], -logits[:, 1]], 1)}


def test_gradcam_by_stage_scores_both_signs_at_every_stage():
    """Negating the stroke logit swaps Grad-CAM's positive and negative parts, stage by stage, and
    each stage is scored on its own grid."""
    prof = p1.PROFILES["smoke"]
    data = _data()
    g = torch.Generator().manual_seed(3)
    data.truth = torch.rand(len(data.table), *prof.spatial_size, generator=g) > 0.97
    method = "supervised image"
    torch.manual_seed(5)
    model = p1.P1Classifier(p1.build_clip(data, prof), "image").eval()
    cams = p1.GradCamStudy(None, None, None, None, "", cases={method: [8, 9, 10]})
    kw = {"device": torch.device("cpu"), "n_random": 20, "seed": 0}
    table = p1.gradcam_by_stage(types.SimpleNamespace(models={method: model}), data, prof, cams, **kw)
    flipped = p1.gradcam_by_stage(types.SimpleNamespace(models={method: _NegatedStroke(model)}), data, prof, cams, **kw)

    grids = {}

    def record(stage):
        def hook(_m, _i, out):
            grids[stage] = "x".join(map(str, out.shape[2:]))
        return hook

    hooks = [getattr(model.clip.image_encoder, st).register_forward_hook(record(st)) for st in p1.RESNET_STAGES]
    with torch.no_grad():
        model(data.batch([8]))
    for h in hooks:
        h.remove()
    assert list(table["stage"]) == [st for st in p1.RESNET_STAGES for _ in p1.STAGE_MAPS]
    assert list(table["map"]) == list(p1.STAGE_MAPS) * len(p1.RESNET_STAGES)
    assert dict(zip(table["stage"], table["grid"])) == grids
    assert (table["cases"] == 3).all()
    # what a perfect map on each stage's grid could reach, for the same cases: finer grids allow more
    for st, g in grids.items():
        want = np.mean([p1.grid_ceiling(tuple(map(int, g.split("x"))), data.truth[r].numpy())["ceiling_ratio"]
                        for r in (8, 9, 10)])
        assert table.loc[table["stage"] == st, "grid_ceiling"].tolist() == pytest.approx([want] * len(p1.STAGE_MAPS))
    per_stage = table.drop_duplicates("stage").set_index("stage")["grid_ceiling"]
    assert per_stage["layer1"] > per_stage["layer4"] > 1

    cols = ["mass_in_lesions", "ratio_to_random", "above_random_p95", "pointing_game"]
    pos, neg = (t.set_index(["stage", "map"]) for t in (table, flipped))
    for st in p1.RESNET_STAGES:
        a, b = p1.STAGE_MAPS[:2]
        np.testing.assert_allclose(neg.loc[(st, a), cols].astype(float), pos.loc[(st, b), cols].astype(float), rtol=1e-5)
        np.testing.assert_allclose(neg.loc[(st, b), cols].astype(float), pos.loc[(st, a), cols].astype(float), rtol=1e-5)
    # the untrained network is built afresh, so its columns do not flip
    np.testing.assert_allclose(table["untrained_ratio"].astype(float), flipped["untrained_ratio"].astype(float))
    # the positive part is the usual Grad-CAM (ReLU on the layer grid, then upsampled), case by case
    for st in p1.RESNET_STAGES:
        mass = []
        for r in (8, 9, 10):
            cam = p1.grad_cam(lambda b: model(b)["logits"], getattr(model.clip.image_encoder, st),
                              {k: v for k, v in data.batch([r]).items() if k != "label"}, target=1, model=model)
            mass.append(p1.localisation_scores(cam.cam, data.truth[r].numpy(), n_random=2)["mass_inside"])
        assert pos.loc[(st, "Grad-CAM"), "mass_in_lesions"] == pytest.approx(np.nanmean(mass), rel=1e-5)
    assert table.loc[table["map"] == "Grad-CAM", "mass_in_lesions"].sum() > 0
    # HiResCAM: captum's gradient x activation at the stage, summed over channels, ReLU, upsampled
    from captum.attr import LayerGradientXActivation

    for st in ("layer1", "layer3"):
        mass = []
        for r in (8, 9, 10):
            b = {k: v for k, v in data.batch([r]).items() if k != "label"}
            lga = LayerGradientXActivation(lambda img, b=b: model({**b, "image": img})["logits"],
                                           getattr(model.clip.image_encoder, st))
            ref = torch.relu(lga.attribute(b["image"].clone(), target=1).sum(1))[0].detach().numpy()
            amap = np.maximum(p1.upsample_layer_map(ref, b["image"].shape[2:]), 0.0)
            mass.append(p1.localisation_scores(amap, data.truth[r].numpy(), n_random=2)["mass_inside"])
        assert pos.loc[(st, "HiResCAM"), "mass_in_lesions"] == pytest.approx(np.nanmean(mass), rel=1e-4)

    vt = next(v for v in p1.VERDICT_TABLES if v.table == "gradcam_by_stage")  # make replicate reads these
    assert {*vt.key, vt.verdict, vt.value} <= set(table.columns)
    assert not table.duplicated(list(vt.key)).any()

    empty = p1.GradCamStudy(None, None, None, None, "", cases={method: []})
    assert "note" in p1.gradcam_by_stage(types.SimpleNamespace(models={method: model}), data, prof, empty, **kw)

    made_up = table.assign(verdict=np.where((table["stage"] == "layer2") & (table["map"] == "Grad-CAM"), "yes", "no"))
    text = p1.stage_verdict(made_up, method)
    assert "- Grad-CAM: beats both baselines at layer2 (" in text
    assert "- Grad-CAM, negative part: beats both baselines at no stage" in text
    assert "- HiResCAM: beats both baselines at no stage" in text
    assert f"layer4 ({grids['layer4']}) {per_stage['layer4']:.2f}x" in text  # the ceilings, for scale


def test_fast_option_keeps_the_function_and_the_checkpoint_keys():
    """prof.fast stores the convolutions channels-last and picks the fused Adam update: the same
    network (identical keys; logits and gradients within fp32 rounding)."""
    data = _data()
    b = data.batch([4, 5, 6, 7])
    models, logits = {}, {}
    for on in (False, True):
        prof = dataclasses.replace(p1.PROFILES["smoke"], fast=on)
        torch.manual_seed(0)
        models[on] = m = p1.P1Classifier(p1.build_clip(data, prof), "ensemble").train()
        convs = [p for p in m.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) == on for p in convs)
        opt = p1._optimizer(torch.optim.AdamW, m, 1e-3, prof)
        assert bool(opt.defaults.get("fused")) == (on and p1.fast.fused_adamw_supported(list(m.parameters())))
        torch.manual_seed(1)  # the same dropout draws
        logits[on] = m(b)["logits"]
        torch.nn.functional.cross_entropy(logits[on], b["label"]).backward()
    assert list(models[False].state_dict()) == list(models[True].state_dict())
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)
    # fp32 rounding of long reductions (BatchNorm over every voxel): ~1e-5 of the gradients' scale
    scale = max(float(p.grad.abs().max()) for p in models[False].parameters() if p.grad is not None)
    for (name, a), c in zip(models[False].named_parameters(), models[True].parameters()):
        torch.testing.assert_close(c.grad, a.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
