"""P3 pipeline (MoRE): profiles, data loading, the model, pre-training and the evaluation tables on a smoke cohort."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from mmlib.cohorts import open_cohort
from mmlib.pipelines import p3
from mmlib.text import cross_modal_recall

SMOKE = p3.PROFILES["smoke"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return open_cohort("xray_ecg", tmp_path_factory.mktemp("p3"), "smoke", 0, show_progress=False)


@pytest.fixture(scope="module")
def data(cohort):
    return p3.load_data(cohort, SMOKE)


@pytest.fixture(scope="module")
def trained(data):
    """A 1-epoch smoke run (seed 0) and its history."""
    return p3.pretrain(data, SMOKE, seed=0)


def test_profiles():
    quick, full = p3.PROFILES["quick"], p3.PROFILES["full"]
    assert (quick.image_size, quick.patch_size, quick.dim, quick.depth, quick.heads) == (64, 8, 64, 4, 4)
    assert quick.ecg_samples // quick.ecg_patch == 100
    assert (full.image_size, full.patch_size, full.dim, full.depth, full.heads, full.ecg_patch) == (224, 16, 768, 12,
                                                                                                   12, 5)
    for prof in (SMOKE, quick, full):
        assert (prof.dropkey, prof.dropkey_mode, prof.text_mode, prof.lora_alpha) == (0.3, "constant", "lora", 8)
        assert prof.proj_dim == 128 and prof.ecg_samples == 1000
    # full keeps the public code's fixed temperature and weight decay; quick departs (see PROFILES)
    assert (full.temperature, full.learnable_temperature, full.weight_decay) == (0.02, False, 0.1)
    assert quick.lora_r == full.lora_r == 16
    assert SMOKE.epochs == 1 and full.epochs == 50
    assert full.text_train_layers is None and quick.text_train_layers == 1  # MoRE adapts every layer; quick the last


def test_compose_text():
    report = ("EXAMINATION: CHEST\n\nINDICATION: cough.\n\nFINDINGS:\nNo effusion. Heart\nis normal.\n\n"
              "IMPRESSION:\nNormal.")
    text = p3.compose_text(report, "Sinus rhythm\nNormal ECG\n")
    assert text == "No effusion. Heart is normal. Sinus rhythm. Normal ECG."
    assert p3.compose_text("Plain text.", "Normal ECG") == "Plain text. Normal ECG."


def test_load_data_shapes_and_pairing(cohort, data):
    n = len(cohort.subjects)
    assert data.xray.shape == (n, 1, SMOKE.image_size, SMOKE.image_size) and data.xray.dtype == torch.float32
    assert 0.0 <= float(data.xray.min()) and float(data.xray.max()) <= 1.0 and float(data.xray.std()) > 0.05
    assert data.ecg.shape == (n, 12, 1000) and data.ecg.dtype == torch.float32
    assert float(data.ecg.abs().max()) <= 1.0 + 1e-6 and torch.isfinite(data.ecg).all()
    assert data.xray_labels.shape == (n, 4) and data.ecg_labels.shape == (n, 5)
    assert set(np.unique(data.xray_labels)) <= {0.0, 1.0} and set(np.unique(data.ecg_labels)) <= {0.0, 1.0}
    np.testing.assert_array_equal(data.ecg_labels[:, 1], cohort.subjects["MI"].to_numpy(dtype=float))
    assert data.table["subject_id"].tolist() == cohort.subjects["subject_id"].astype(str).tolist()
    assert sum(len(data.index(s)) for s in p3.SPLITS) == n and len(data.index("test")) > 0
    for i in (0, 7, n - 1):
        report = (cohort.root / cohort.subjects["report"].iloc[i]).read_text()
        statement = (cohort.root / cohort.subjects["ecg_statement"].iloc[i]).read_text()
        first_words = " ".join(report.split("FINDINGS:")[1].split()[:6])
        assert data.texts[i].startswith(first_words)
        assert statement.splitlines()[0].strip().rstrip(".") in data.texts[i]
    assert len(set(data.texts)) > n // 2


def test_load_data_errors_name_column_and_file(cohort):
    no_hyp = dataclasses.replace(cohort, subjects=cohort.subjects.drop(columns="HYP"))
    with pytest.raises(ValueError, match=r"subjects\.csv.*'HYP'"):
        p3.load_data(no_hyp, SMOKE)
    sub = cohort.subjects.copy()
    sub.loc[0, "xray"] = "xray/missing.png"
    with pytest.raises(ValueError, match=r"missing\.png.*'xray'"):
        p3.load_data(dataclasses.replace(cohort, subjects=sub), SMOKE)


def test_model_outputs_unit_norm(data):
    torch.manual_seed(0)
    model = p3.build_model(SMOKE).eval()
    with torch.no_grad():
        out = model(data.batch(np.arange(5)))
    assert set(out) == {"text", "xray", "ecg"}
    for z in out.values():
        assert z.shape == (5, 128)
        torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert model.text.trainable_parameters()["reduction_vs_full"] > 0.99  # LoRA
    frozen = p3.build_model(SMOKE, text_mode="frozen", dropkey_mode="linear")
    assert frozen.text.trainable_parameters()["trainable"] == 0
    assert frozen.xray.encoder.dropkey_rates == [0.3]


def test_pretrain_deterministic(data, trained):
    _, hist = trained
    _, again = p3.pretrain(data, SMOKE, seed=0)
    cols = [c for c in hist.columns if c != "seconds"]
    assert cols == ["epoch", "train_loss", "val_loss", "train_text_xray", "val_text_xray", "train_text_ecg",
                    "val_text_ecg"]
    assert len(hist) == SMOKE.epochs and np.isfinite(hist[cols].to_numpy()).all()
    pd.testing.assert_frame_equal(hist[cols], again[cols])


def test_pretrain_train_loss_goes_down(data):
    # one full batch per epoch (28 training pairs), no DropKey, a gentle lr: three steps must lower the loss
    prof = SMOKE.replace(epochs=3, batch_size=32, lr=2e-4, text_lr=2e-4)
    _, hist = p3.pretrain(data, prof, dropkey_mode="off", seed=0)
    loss = hist["train_loss"].to_numpy()
    assert loss[-1] < loss[0] and loss[1] < loss[0]


@pytest.mark.parametrize("batch_size", [9, 10])  # 28 training pairs: 9+9+9+1 (the 1-pair batch skipped); 10+10+8
def test_pretrain_history_is_the_pair_weighted_mean_of_the_batch_losses(data, batch_size, monkeypatch):
    """pretrain runs on mmlib.train.fit: with a learning rate of 0 the weights stay the initial ones, so an epoch's
    logged losses are the pair-weighted means of TriModalLoss over the same batches, recomputed here by hand with
    fit's dropout / DropKey stream (torch seeded with seed * 100_003 + epoch) and the same shuffle."""
    from mmlib.losses import TriModalLoss
    from mmlib.train import index_batches

    seed = 2
    prof = SMOKE.replace(batch_size=batch_size, eval_batch_size=3, lr=0.0, text_lr=0.0)  # 4 val pairs: 3 + 1 (skipped)
    trainable_seen = []  # trainable model parameters at every loss call, training and validation
    forward = p3._PretrainLoss.forward

    def spy(self, m, batch):
        trainable_seen.append(sum(p.requires_grad for p in m.parameters()))
        return forward(self, m, batch)

    monkeypatch.setattr(p3._PretrainLoss, "forward", spy)
    model, hist = p3.pretrain(data, prof, seed=seed)
    monkeypatch.undo()
    torch.manual_seed(seed)
    fresh = p3.build_model(prof)
    # fit's freezing schedule kept the frozen text weights frozen while training (and the flags are as built)
    assert set(trainable_seen) == {sum(p.requires_grad for p in fresh.parameters())}
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()]
    assert not model.training
    loss_fn = TriModalLoss(prof.temperature)

    def mean(idx, size, shuffle_seed, train):
        fresh.train(train)
        sums, n = np.zeros(3), 0
        with torch.no_grad():
            for chunk in index_batches(idx, size, shuffle_seed=shuffle_seed):
                if len(chunk) < 2:
                    continue
                emb = fresh(data.batch(chunk))
                out = loss_fn(emb["text"], emb["xray"], emb["ecg"])
                sums += len(chunk) * np.array([float(out[k]) for k in ("loss", "text_xray", "text_ecg")])
                n += len(chunk)
        return sums / n

    torch.manual_seed(seed * 100_003)  # fit's torch stream of epoch 0
    train = mean(data.index("train"), batch_size, seed * 100_003, True)
    val = mean(data.index("val"), 3, None, False)
    np.testing.assert_allclose(hist.loc[0, ["train_loss", "train_text_xray", "train_text_ecg"]].to_numpy(float), train,
                               rtol=1e-5)
    np.testing.assert_allclose(hist.loc[0, ["val_loss", "val_text_xray", "val_text_ecg"]].to_numpy(float), val,
                               rtol=1e-5)


def test_learnable_temperature_is_trained(data, trained):
    # the learnable temperature is in the optimizer: its AdamW step after the first batch changes the second
    # batch's loss, so the epoch's training loss differs from the fixed-temperature run of the same seed
    _, fixed = trained
    _, learnt = p3.pretrain(data, SMOKE.replace(learnable_temperature=True), seed=0)
    assert abs(learnt.loc[0, "train_loss"] - fixed.loc[0, "train_loss"]) > 1e-6
    assert learnt.loc[0, "val_loss"] != fixed.loc[0, "val_loss"]


def test_two_modality_pretraining_has_no_ecg_term(data):
    model, hist = p3.pretrain(data, SMOKE, modalities=("xray",), seed=3)
    assert not any("ecg" in c for c in hist.columns) and "train_text_xray" in hist
    np.testing.assert_allclose(hist["train_loss"], hist["train_text_xray"])
    torch.manual_seed(3)
    fresh = p3.build_model(SMOKE)
    for a, b in zip(model.ecg.parameters(), fresh.ecg.parameters()):  # the ECG side was never updated
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(model.xray.parameters(), fresh.xray.parameters()))
    with pytest.raises(ValueError, match="modalities"):
        p3.pretrain(data, SMOKE, modalities=("text",))


def test_evaluation_tables(data, trained):
    model, _ = trained
    n_test = len(data.index("test"))
    zs = p3.zero_shot_table(model, data)
    assert zs["class"].tolist() == [*p3.XRAY_FINDINGS, *p3.ECG_CLASSES]
    assert zs["modality"].tolist() == ["xray"] * 4 + ["ecg"] * 5 and (zs["n"] == n_test).all()
    for col in ("auroc", "auroc_positive_only"):
        v = zs[col].dropna().to_numpy()
        assert len(v) >= 7 and ((v >= 0) & (v <= 1)).all()

    rt = p3.retrieval_table(model, data)
    ks = [k for k in (1, 5, 10) if k <= n_test]
    assert len(rt) == 6 * len(ks)
    assert set(zip(rt["query"], rt["target"])) == {(a, b) for a in ("text", "xray", "ecg")
                                                   for b in ("text", "xray", "ecg") if a != b}
    assert rt["recall"].between(0, 1).all()
    np.testing.assert_allclose(rt["chance"], rt["k"] / n_test)

    lp = p3.linear_probe_table(model, data)
    assert lp["class"].tolist() == [*p3.XRAY_FINDINGS, *p3.ECG_CLASSES]
    v = lp["auroc"].dropna().to_numpy()
    assert len(v) >= 7 and ((v >= 0) & (v <= 1)).all()


def test_retrieval_table_equals_cross_modal_recall(data, trained):
    model, _ = trained
    emb = p3.embed(model, data, data.index("test"))
    assert {k: v.shape for k, v in emb.items()} == {k: (len(data.index("test")), 128) for k in ("text", "xray", "ecg")}
    np.testing.assert_allclose(np.linalg.norm(emb["xray"], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb["xray"][0], emb["xray"][1])
    table = p3.retrieval_table(model, data, ks=(1, 5), embeddings=emb)
    assert table.equals(p3.retrieval_table(model, data, ks=(1, 5)))  # embedding is deterministic in eval mode
    for a, b in (("text", "xray"), ("text", "ecg"), ("xray", "ecg")):
        ref = cross_modal_recall(emb[a], emb[b], (1, 5), names=(a, b))
        for q, t in ((a, b), (b, a)):
            for k in (1, 5):
                row = table[(table["query"] == q) & (table["target"] == t) & (table["k"] == k)]
                assert len(row) == 1
                assert row["recall"].item() == ref[f"{q}->{t} R@{k}"]
                assert row["chance"].item() == ref[f"chance@{k}"]


# --------------------------------------------------------------------------- baselines, ablations, attention, claims


def test_standardise_xray_per_image():
    x = torch.rand(3, 1, 8, 8) * torch.tensor([1.0, 0.2, 5.0]).view(3, 1, 1, 1) + torch.tensor([0.0, 0.7, -2.0]).view(
        3, 1, 1, 1)
    z = p3.standardise_xray(x)
    torch.testing.assert_close(z.mean(dim=(-2, -1)), torch.zeros(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(-2, -1)), torch.ones(3, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(p3.standardise_xray(3 * x + 1), z, atol=1e-4, rtol=0)  # exposure-invariant


def test_text_parameter_table_counts_the_paper_lora():
    table = p3.text_parameter_table(p3.PROFILES["quick"])
    lora = table.loc["LoRA r=16, query/value, every layer (MoRE)"]
    assert lora["trainable"] == 6 * 2 * 2 * 16 * 384  # 6 layers x (query, value) x (A, B) x r x width
    assert lora["fewer than full (%)"] == pytest.approx(100 * (1 - 147_456 / 22_565_376))
    assert table.loc["frozen", "trainable"] == 0 and table.loc["full fine-tuning (every layer)", "% trainable"] == 100
    assert table.loc["LoRA r=16, last 1 layer(s) (this profile)", "trainable"] == 147_456 // 6


def test_supervised_table_is_deterministic_and_bounded(data):
    a = p3.supervised_table(data, SMOKE, seed=1)
    assert a["class"].tolist() == [*p3.XRAY_FINDINGS, *p3.ECG_CLASSES]
    v = a["auroc"].dropna()
    assert len(v) >= 7 and v.between(0, 1).all()
    pd.testing.assert_frame_equal(a, p3.supervised_table(data, SMOKE, seed=1))


def test_finding_masks_and_attention_scores(cohort, data, trained, monkeypatch):
    from mmlib.cohorts.xray_ecg import FINDING_BITS

    model, _ = trained
    masks = p3.load_finding_masks(cohort, data)
    lat = cohort.latents().set_index("subject_id").loc[data.table["subject_id"]]
    for f, bit in FINDING_BITS.items():
        has = ((masks & bit) > 0).reshape(len(masks), -1).any(1)
        np.testing.assert_array_equal(has, lat[f"true_{f}"].to_numpy().astype(bool))
    maps = p3.xray_attention_maps(model, data, data.index("test")[:3], size=masks.shape[-1])
    assert maps.shape == (3, *masks.shape[1:]) and (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-5)

    # a uniform map puts exactly the mask's area inside it: lift 1; a map on the mask: lift 1 / area, pointing hit
    size = masks.shape[-1]
    monkeypatch.setattr(p3, "xray_attention_maps",
                        lambda m, d, idx, size=size, **k: np.full((len(idx), size, size), 1.0 / size**2))
    uniform = p3.attention_scores(model, data, masks)
    np.testing.assert_allclose(uniform["lift"], 1.0, rtol=1e-9)
    np.testing.assert_allclose(uniform["mass in finding"], uniform["area"], rtol=1e-9)
    test = data.index("test")

    def on_effusion(m, d, idx, size=size, **k):
        inside = ((masks[np.asarray(idx)] & FINDING_BITS["pleural_effusion"]) > 0).astype(float) + 1e-12
        return inside / inside.sum(axis=(1, 2), keepdims=True)

    monkeypatch.setattr(p3, "xray_attention_maps", on_effusion)
    focused = p3.attention_scores(model, data, masks).set_index("finding")
    np.testing.assert_allclose(uniform["peak / mean"], 1.0, rtol=1e-9)
    if "pleural_effusion" in focused.index:
        row = focused.loc["pleural_effusion"]
        assert row["mass in finding"] == pytest.approx(1.0) and row["pointing game"] == 1.0
        assert row["lift"] == pytest.approx(1.0 / row["area"]) and row["n"] == int(
            ((masks[test] & FINDING_BITS["pleural_effusion"]) > 0).reshape(len(test), -1).any(1).sum())


def test_saliency_maps_and_scores(cohort, data, trained):
    model, _ = trained
    masks = p3.load_finding_masks(cohort, data)
    test = data.index("test")
    sal = p3.xray_saliency_maps(model, data, test[:3], "edema", size=masks.shape[-1])
    assert sal.shape == (3, *masks.shape[1:]) and (sal >= 0).all()
    np.testing.assert_allclose(sal.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind
    table = p3.attention_scores(model, data, masks, methods=("rollout", "saliency"))
    assert set(table["method"]) == {"rollout", "saliency"}
    assert (table.groupby("method").size() == table["finding"].nunique()).all()
    assert table["lift"].gt(0).all() and table["pointing game"].between(0, 1).all()
    with pytest.raises(ValueError, match="no prompts for finding 'fracture'"):
        p3.xray_saliency_maps(model, data, test[:1], "fracture")
    with pytest.raises(ValueError, match="methods"):
        p3.attention_scores(model, data, masks, methods=("gradcam",))


def test_ecg_attention_sums_to_one(data, trained):
    model, _ = trained
    att = p3.ecg_attention(model, data, [0, 1, 2])
    assert att.shape == (3, SMOKE.ecg_samples) and (att >= 0).all()
    np.testing.assert_allclose(att.sum(1), 1.0, atol=1e-5)


def test_condition_labels_follow_the_latents(cohort, data):
    labels = p3.condition_labels(cohort, data)
    lat = cohort.latents().set_index("subject_id").loc[data.table["subject_id"]]
    n_cond = lat[[c for c in lat.columns if c.startswith("cond_")]].sum(axis=1).to_numpy()
    assert ((labels == "none") == (n_cond == 0)).all() and ((labels == "2+ conditions") == (n_cond > 1)).all()
    one = n_cond == 1
    assert all(lat.iloc[i][f"cond_{labels[i].replace(' ', '_')}"] for i in np.flatnonzero(one))


def test_real_ecg_demo_reads_the_pydicom_recording(data, trained):
    model, _ = trained
    nearest, scores, signal = p3.real_ecg_demo(model, data, SMOKE, top=4)
    assert signal.shape == (12, SMOKE.ecg_samples) and np.abs(signal).max() <= 1.0 + 1e-6
    assert (np.abs(signal).max(axis=1) > 0.99).all()  # every lead scaled to [-1, 1]
    assert len(nearest) == 4 and nearest["cosine"].is_monotonic_decreasing
    texts = dict(zip(data.table["subject_id"], data.texts))
    assert all(texts[s] == t for s, t in zip(nearest["subject"], nearest["text"]))
    assert scores["class"].tolist() == list(p3.ECG_CLASSES)
    assert scores["percentile among test ECGs"].between(0, 100).all()


def test_run_ablations_reuses_the_main_run(data, trained):
    table, hist = p3.run_ablations(data, SMOKE, seed=0, main=trained)
    assert table["variant"].tolist() == list(p3.ABLATIONS)
    assert set(hist["variant"]) == set(p3.ABLATIONS)
    ab = table.set_index("variant")
    main_row = p3.run_summary(trained[0], data)
    for k, v in main_row.items():
        assert ab.iloc[0][k] == pytest.approx(v, nan_ok=True)
    assert np.isnan(ab.loc["text + X-ray only", "zero-shot ECG (mean AUROC)"])
    assert np.isnan(ab.loc["text + ECG only", "text<->X-ray R@5"])
    assert np.isnan(ab.loc["text + ECG only", "X-ray rollout peak / mean"])
    assert (ab["X-ray rollout peak / mean"].dropna() >= 1.0).all()
    assert not np.isnan(ab.loc["text + ECG only", "text<->ECG R@5"])
    # DropKey off changes training (smoke: one layer, so "linear" = "constant")
    assert ab.loc["DropKey off", "zero-shot X-ray (mean AUROC)"] != ab.iloc[0]["zero-shot X-ray (mean AUROC)"]


def _classification(zero_shot: float) -> pd.DataFrame:
    classes = [*p3.XRAY_FINDINGS, *p3.ECG_CLASSES]
    return pd.DataFrame({"modality": ["xray"] * 4 + ["ecg"] * 5, "class": classes, "n": 100, "n_positive": 20,
                         "zero-shot": zero_shot, "zero-shot 95% lo": zero_shot - 0.1,
                         "zero-shot 95% hi": zero_shot + 0.1,
                         "linear probe": 0.8, "supervised from scratch": 0.85})


_MODS = ("xray",) * 4 + ("ecg",) * 5


def _scores(quality: float, n: int = 200, left_out: str | None = None) -> p3.SubjectScores:
    """Synthetic per-subject scores of one variant on the same n subjects (fixed labels and noise):
    higher ``quality`` separates the classes more and retrieves more pairs, subject by subject."""
    rng = np.random.default_rng(0)
    labels = (rng.random((n, 9)) < 0.3).astype(np.int8)
    zs = labels * 4 * (quality - 0.5) + rng.normal(size=(n, 9))
    hits = (rng.random((n, 4)) < quality - 0.5).astype(float)
    if left_out is not None:
        zs[:, [j for j, m in enumerate(_MODS) if m == left_out]] = np.nan
        hits[:, [0, 1] if left_out == "xray" else [2, 3]] = np.nan
    return p3.SubjectScores(labels=labels, values=np.concatenate([zs, hits], 1), class_modality=_MODS)


def _ablations(main: float, off: float, full: float) -> pd.DataFrame:
    """An ablation table whose rows are computed from synthetic subject scores, carried in its attrs."""
    rows, subjects = [], {}
    for name in p3.ABLATIONS:
        v = {"DropKey off": off, "text encoder fully fine-tuned": full}.get(name, main)
        left_out = {"text + X-ray only": "ecg", "text + ECG only": "xray"}.get(name)
        subjects[name] = _scores(v, left_out=left_out)
        peak = 1.5 if name == "DropKey off" else (1.2 if main > off else 1.8)  # smoother exactly when better
        rows.append({"variant": name, **dict(zip(p3.SCORE_COLUMNS, subjects[name].components())),
                     "X-ray rollout peak / mean": peak, "X-ray attention lift in findings": 1.0})
    table = pd.DataFrame(rows)
    table.attrs["subject_scores"] = subjects
    return table


def test_auroc_columns_equal_roc_auc_score():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random((60, 3)) < 0.4).astype(int)
    s = np.round(rng.normal(size=(60, 3)) + y, 1)  # rounded: ties within and across the classes
    y[:, 2] = 0
    auc = p3._auroc_columns(y, s)
    assert auc[:2] == pytest.approx([roc_auc_score(y[:, j], s[:, j]) for j in range(2)], abs=1e-12)
    assert np.isnan(auc[2])  # one label value: undefined, not 0.5


def test_score_components_average_the_defined_classes():
    """A class without positives among the subjects drops out of its modality's mean (as pandas' mean in
    run_summary skips it); a modality left out is NaN."""
    s = _scores(0.8)
    labels = s.labels.copy()
    labels[:, 0] = 0
    comp = p3.score_components(labels, s.values, _MODS)
    assert comp[0] == pytest.approx(p3._auroc_columns(labels[:, 1:4], s.values[:, 1:4]).mean())
    assert comp[2] == pytest.approx(s.values[:, 9:11].mean())
    assert np.isnan(_scores(0.8, left_out="ecg").components()[[1, 3]]).all()


def test_subject_scores_give_the_ablation_rows_numbers(data, trained):
    """The per-subject scores average back to zero_shot_table's and retrieval_table's numbers (computed apart)."""
    model, _ = trained
    zs = p3.zero_shot_table(model, data)
    ret = p3.retrieval_table(model, data, ks=(5,))
    expect = [zs.loc[zs["modality"] == "xray", "auroc"].mean(), zs.loc[zs["modality"] == "ecg", "auroc"].mean()]
    for mod in ("xray", "ecg"):
        pair = ret[((ret["query"] == "text") & (ret["target"] == mod)) | ((ret["query"] == mod) & (ret["target"] == "text"))]
        expect.append(pair["recall"].mean())
    s = p3.subject_scores(model, data)
    assert s.values.shape == (len(data.index("test")), 9 + 4) and s.class_modality == _MODS
    assert s.components() == pytest.approx(expect, abs=1e-9)
    row = p3.run_summary(model, data)
    assert s.components() == pytest.approx([row[c] for c in p3.SCORE_COLUMNS], abs=1e-9)
    only = p3.subject_scores(model, data, ("xray",)).components()
    assert only[[0, 2]] == pytest.approx(np.asarray(expect)[[0, 2]], abs=1e-9) and np.isnan(only[[1, 3]]).all()


def test_ablation_differences_recover_a_planted_gap_and_compare_shared_scores_only():
    table = _ablations(0.8, 0.7, 0.8)
    d = p3.ablation_differences(table, n_boot=200)
    main = next(iter(p3.ABLATIONS))
    assert len(d) == 6 and (d["a"] != main).sum() == 1  # linear minus off; the rest are the main run minus b
    lin = d[d["a"] != main].iloc[0]
    assert lin["b"] == "DropKey off" and lin["difference"] > 0  # linear is the main run's 0.8 here
    d = d[d["a"] == main].set_index("b")
    off = d.loc["DropKey off"]  # the main run separates and retrieves better than DropKey off, subject by subject
    assert off["difference"] > 0 and off["95% lo"] > 0 and off["p"] < 0.05
    same = d.loc["text encoder fully fine-tuned"]  # identical scores: exactly no difference
    assert (same["difference"], same["95% lo"], same["95% hi"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    # a two-modality run is compared on its own modality: identical there, so no difference either
    xr = d.loc["text + X-ray only"]
    assert xr["scores"] == "zero-shot X-ray (mean AUROC), text<->X-ray R@5" and xr["difference"] == 0.0
    ab = table.set_index("variant")
    est = ab.loc[main, list(p3.SCORE_COLUMNS)].mean() - ab.loc["DropKey off", list(p3.SCORE_COLUMNS)].mean()
    assert off["difference"] == pytest.approx(est, abs=1e-12)  # the table's numbers, not a second definition
    read_back = table.copy()
    read_back.attrs.clear()  # as a table read from CSV
    with pytest.raises(ValueError, match="subject_scores"):
        p3.ablation_differences(read_back)


def test_claims_read_the_paired_intervals():
    params = p3.text_parameter_table(SMOKE)
    retrieval = pd.DataFrame({"query": ["text", "xray"], "target": ["xray", "text"], "k": 10, "recall": 0.3,
                              "chance": 0.1, "n": 100})
    table = _ablations(0.8, 0.7, 0.8)
    main = next(iter(p3.ABLATIONS))

    def claims(lora_lo, lora_est, dk_lo, two_lo):
        rows = [("text encoder", main, "text encoder fully fine-tuned", lora_est, lora_lo),
                ("DropKey", main, "DropKey off", 0.05, dk_lo),
                ("DropKey", "DropKey linear in depth (paper text)", "DropKey off", 0.05, dk_lo),
                ("modalities", main, "text + X-ray only", 0.05, two_lo),
                ("modalities", main, "text + ECG only", 0.05, 0.01)]
        diffs = pd.DataFrame([{"group": g, "a": a, "b": b, "difference": e, "95% lo": lo, "95% hi": e + 0.05}
                              for g, a, b, e, lo in rows])
        return p3.claims_table(_classification(0.8), retrieval, table, params, None, diffs).set_index("claim")["held"]

    lora, dk, two = ("LoRA keeps quality with a tiny fraction of trainable text parameters",
                     "attention dropping (DropKey) helps", "three modalities in one space beat two")
    held = claims(-0.01, 0.0, 0.01, 0.01)
    assert (held[lora], held[dk], held[two]) == ("yes", "yes", "yes")
    held = claims(-0.03, -0.01, -0.01, -0.01)  # the same estimates, intervals reaching past the line
    assert held[lora].startswith("partly") and held[two] == "partly"
    assert held[dk] == "partly"  # smoother (peak 1.2 vs 1.5), better not established
    assert claims(-0.05, -0.03, 0.01, 0.01)[lora] == "no"


def test_claims_follow_the_numbers():
    params = p3.text_parameter_table(SMOKE)
    retrieval = pd.DataFrame({"query": ["text", "xray", "text", "ecg", "xray", "ecg"],
                              "target": ["xray", "text", "ecg", "text", "ecg", "xray"], "k": 10,
                              "recall": [0.3, 0.3, 0.4, 0.4, 0.05, 0.2], "chance": 0.1, "n": 100})
    flat = pd.DataFrame({"method": "rollout", "finding": list(p3.XRAY_FINDINGS), "lift": 1.0, "peak / mean": 1.05,
                         "pointing game": 0.0, "pointing chance": 0.05})
    good = p3.claims_table(_classification(0.8), retrieval, _ablations(0.8, 0.7, 0.8), params,
                           flat.assign(lift=2.0)).set_index("claim")
    bad = p3.claims_table(_classification(0.5), retrieval.assign(recall=0.05), _ablations(0.6, 0.7, 0.8),
                          params, flat).set_index("claim")
    for claim in ("tri-modal pre-training gives useful zero-shot classification", "retrieval across modalities works",
                  "LoRA keeps quality with a tiny fraction of trainable text parameters",
                  "attention dropping (DropKey) helps", "attention maps show where the findings are"):
        assert bad.loc[claim, "held"] == "no", claim
    assert good.loc["tri-modal pre-training gives useful zero-shot classification", "held"] == "yes"
    assert good.loc["retrieval across modalities works", "held"] == "partly"  # X-ray -> ECG below chance
    assert good.loc["LoRA keeps quality with a tiny fraction of trainable text parameters", "held"] == "yes"
    assert good.loc["attention dropping (DropKey) helps", "held"] == "yes"
    assert good.loc["attention maps show where the findings are", "held"] == "yes"
    pvr = p3.paper_vs_run(_classification(0.8), params)
    assert list(pvr.columns) == ["quantity", "paper reported", "this run", "held on this data"]
    assert "9/9 inside" in pvr.loc[0, "this run"]


def test_real_data_path_without_truth_or_masks(cohort, data, trained):
    """A real cohort has no truth card and no findings masks: every stage still runs, the ground-truth parts step aside."""
    model, _ = trained
    real = dataclasses.replace(cohort, subjects=cohort.subjects.drop(columns="findings_mask"),
                               manifest=cohort.manifest.model_copy(update={"truth": None}))
    assert p3.load_finding_masks(real, data) is None
    assert p3.condition_labels(real, data) is None
    fig = p3.attention_figure(model, data, None, per_finding=1)
    assert len(fig.axes) >= 4
    # one colour bar for the X-ray maps, one for the ECG rollout: each map runs from its min to its max
    xray_bar, ecg_bar = "X-ray map, each from its min to its max", "ECG attention"
    bars = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel() in (xray_bar, ecg_bar)}
    assert set(bars) == {xray_bar, ecg_bar}
    assert all([t.get_text() for t in bar.get_yticklabels()] == ["min", "max"] for bar in bars.values())
    overlays = [im for ax in fig.axes for im in ax.get_images()[1:]]  # the map over each radiograph
    assert overlays and all(im.get_clim() == (0.0, 1.0) and float(im.get_array().min()) == 0.0
                            and float(im.get_array().max()) == 1.0 for im in overlays)
    assert all("peak / mean" in ax.get_title() for ax in fig.axes if len(ax.get_images()) == 2)
    fig = p3.umap_figure(model, data, None)
    labels = {t.get_text() for t in fig.axes[1].get_legend().get_texts()}
    assert labels <= {"NORM ECG", "abnormal ECG"} and labels
    import matplotlib.pyplot as plt

    plt.close("all")
    classification = _classification(0.8)
    retrieval = p3.retrieval_table(model, data)
    ablations = _ablations(0.8, 0.7, 0.8).drop(columns="X-ray attention lift in findings")
    claims = p3.claims_table(classification, retrieval, ablations, p3.text_parameter_table(SMOKE), None)
    assert "attention maps show where the findings are" not in set(claims["claim"])
    assert "attention dropping (DropKey) helps" in set(claims["claim"])


def test_classification_figure_keeps_its_legend_off_the_bars():
    import matplotlib.pyplot as plt

    fig = p3.classification_figure(_classification(0.9))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert not legend.get_window_extent(renderer).overlaps(ax.patch.get_window_extent(renderer))
    assert legend.get_window_extent(renderer).y0 >= fig.bbox.y0 - 0.5  # and not cut off
    assert any("95% bootstrap CI" in t.get_text() for t in legend.get_texts())  # the error bars are named
    plt.close(fig)
