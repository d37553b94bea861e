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
