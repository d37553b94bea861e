"""P4 pipeline: data checks, CT tokens, the model zoo, c-index tables, the balance sweep's outcomes, claims."""

from __future__ import annotations

import types
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from mmlib import metrics
from mmlib.pipelines import p4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic(n: int = 600, beta_ct: float = 1.5, beta_ehr: float = 1.5, seed: int = 0):
    """A P4Data without images and Embeddings whose CT and EHR tokens carry u and z (planted)."""
    rng = np.random.default_rng(seed)
    u, z = rng.normal(size=(2, n))
    t = rng.exponential(1 / np.exp(beta_ct * u + beta_ehr * z))
    c = rng.uniform(0, np.quantile(t, 0.8), n)
    split = np.array(["train"] * n, dtype=object)
    split[n // 2: n // 2 + n // 10] = "val"
    split[n // 2 + n // 10: n // 2 + n // 10 + n // 5] = "test"
    split[n // 2 + n // 10 + n // 5:] = "external"
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "site": np.where(split == "external", "external",
                          "internal"), "split": split, "time_days": np.ceil(np.minimum(t, c) * 100) + 1,
                          "event": (t <= c).astype(int)})
    data = p4.P4Data(table=table, images=None, events=pd.DataFrame())

    def noisy(x, width, tokens):
        out = rng.normal(size=(n, tokens, width)).astype(np.float32)
        out[:, :, 0] += x[:, None]
        return torch.tensor(out)

    fm = noisy(z, 4, 3)
    mask = torch.zeros(n, 3, dtype=torch.bool)
    mask[::2, 0] = True  # some padded visits
    emb = p4.Embeddings(ct=noisy(u, 4, 2), ehr={"one-hot": {"ehr": noisy(z, 5, 1)[:, 0]},
                                                 "foundation model": {"ehr": fm, "ehr_mask": mask,
                                                                      "ehr_patient": noisy(z, 4, 1)[:, 0]}})
    return data, emb


PROF = replace(p4.PROFILES.get_profile("smoke"), fusion_epochs=80, fusion_lr=1e-2, patience=20, fusion_dim=8,
               fusion_hidden=8, n_boot=200)


def test_model_specs_cover_three_unimodal_and_every_strategy_per_representation():
    specs = p4.model_specs()
    assert specs["model"].is_unique
    assert (specs["family"] == "unimodal").sum() == 3
    assert len(specs) == 3 + len(p4.STRATEGIES) * len(p4.EHR_REPS)
    with pytest.raises(ValueError, match="unknown strategy"):
        p4.build_model("early fusion", {"ct": 4, "ehr": 4}, PROF)


def test_every_model_scores_a_batch_of_one():
    data, emb = _synthetic(40)
    for spec in p4.model_specs().itertuples():
        batch = emb.inputs(np.array([3]), spec.ehr, ehr_tokens="attention" in spec.strategy)
        if spec.ehr == "foundation model":  # attention models see the visits, the others the patient vector
            assert batch["ehr"].ndim == (3 if "attention" in spec.strategy else 2), spec.model
        if spec.family == "unimodal":
            batch = {k: v for k, v in batch.items() if k.startswith(spec.strategy)}
        dims = {k: int(v.shape[-1]) for k, v in batch.items() if k in ("ct", "ehr")}
        model = p4.build_model(spec.strategy, dims, PROF).eval()
        assert model(batch)["risk"].shape == (1,), spec.model


@pytest.fixture(scope="module")
def both_trained():
    data, emb = _synthetic()
    specs = p4.model_specs(["late fusion", "contrastive"], ["one-hot"])
    trained = p4.train_models(emb, data, PROF, specs=specs)
    return data, emb, trained, p4.cindex_table(trained, data, PROF)


def test_fusion_beats_unimodal_when_both_modalities_carry_signal(both_trained):
    data, _, trained, table = both_trained
    t = table.set_index("model")
    assert t.loc["CT only", "internal c"] > 0.65 and t.loc["EHR one-hot only", "internal c"] > 0.65
    late = t.loc["late fusion · one-hot"]
    assert late["internal gain"] > 0.03
    assert float(late["internal gain 95% CI"].split(" to ")[0]) > 0


def test_gain_is_the_difference_to_the_unimodal_model_chosen_on_validation(both_trained):
    data, _, trained, table = both_trained
    best = table.attrs["best_unimodal"]
    va, te = data.index("val"), data.index("test")
    val_c = {m: metrics.concordance_index(trained.event[va], trained.time[va], trained.risk[m][va])
             for m in ("CT only", "EHR one-hot only")}
    assert best == max(val_c, key=val_c.get)
    row = table.set_index("model").loc["contrastive · one-hot"]
    ev, tm = trained.event[te], trained.time[te]
    expected = (metrics.concordance_index(ev, tm, trained.risk["contrastive · one-hot"][te])
                - metrics.concordance_index(ev, tm, trained.risk[best][te]))
    assert row["internal gain"] == pytest.approx(expected, abs=1e-12)
    # the choice ignores the test set: swapping the test risks of the unimodal models changes nothing
    swapped = p4.Trained(specs=trained.specs, risk=dict(trained.risk), history=trained.history, time=trained.time,
                         event=trained.event)
    a, b = swapped.risk["CT only"].copy(), swapped.risk["EHR one-hot only"].copy()
    a[te], b[te] = trained.risk["EHR one-hot only"][te], trained.risk["CT only"][te]
    swapped.risk["CT only"], swapped.risk["EHR one-hot only"] = a, b
    assert p4.best_unimodal(swapped, data) == best


def test_fusion_does_not_beat_the_informative_modality_when_the_other_is_empty():
    data, emb = _synthetic(beta_ehr=0.0, seed=1)
    specs = p4.model_specs(["late fusion"], ["one-hot"])
    table = p4.cindex_table(p4.train_models(emb, data, PROF, specs=specs), data, PROF)
    t = table.set_index("model")
    assert table.attrs["best_unimodal"] == "CT only"
    late = t.loc["late fusion · one-hot"]
    # shuffling the informative CT across subjects destroys the ranking; shuffling the empty EHR hardly matters
    assert late["internal c, CT shuffled"] < 0.6 < late["internal c"]
    assert abs(late["internal c, EHR shuffled"] - late["internal c"]) < 0.03
    assert t.loc["EHR one-hot only", "internal c"] < 0.6
    assert float(t.loc["late fusion · one-hot", "internal gain 95% CI"].split(" to ")[0]) < 0


def test_late_fusion_combines_the_trained_unimodal_models():
    data, emb = _synthetic(120)
    specs = p4.model_specs(["late fusion"], ["one-hot"])
    trained = p4.train_models(emb, data, PROF, specs=specs)
    assert PROF.model_seeds == (0,)
    # the branches are the unimodal models themselves, frozen: the late risk is exactly a linear combination of theirs
    r = trained.risk
    design = np.stack([np.ones(len(data.table)), r["CT only"], r["EHR one-hot only"]], axis=1)
    coef, *_ = np.linalg.lstsq(design, r["late fusion · one-hot"], rcond=None)
    assert np.abs(design @ coef - r["late fusion · one-hot"]).max() < 1e-4
    assert (coef[1:] > 0).all(), "both modalities carry signal: both weights stay positive"
    with pytest.raises(ValueError, match="train .*EHR one-hot only"):
        p4.train_models(emb, data, PROF, specs=specs[specs["model"] != "EHR one-hot only"])


def test_training_is_deterministic(both_trained):
    data, emb, _, _ = both_trained
    specs = p4.model_specs(["late fusion", "contrastive"], ["one-hot"])
    # both runs here, under this test's thread count (the module fixture may have run under another)
    trained = p4.train_models(emb, data, PROF, specs=specs)
    again = p4.train_models(emb, data, PROF, specs=specs)
    for m in trained.risk:
        assert np.array_equal(trained.risk[m], again.risk[m]), m


def test_ct_tokens_average_to_the_multiscale_global_average():
    from mmlib.models import ResNetEncoder

    torch.manual_seed(0)
    enc = ResNetEncoder(widths=(4, 8, 8, 16), layers=(1, 1, 1, 1)).eval()
    x = torch.rand(3, 1, 64, 64, 32)
    tokens = p4.ct_tokens(enc, x, batch_size=2)
    assert tokens.shape == (3, 2 * 2 * 1, 8 + 8 + 16)
    with torch.no_grad():
        h = enc.layer1(enc.maxpool(enc.act(enc.bn1(enc.conv1(x)))))
        f2 = enc.layer2(h)
        f3 = enc.layer3(f2)
        f4 = enc.layer4(f3)
    gap = torch.cat([f.mean(dim=(2, 3, 4)) for f in (f2, f3, f4)], dim=1)
    assert torch.allclose(tokens.mean(1), gap, atol=1e-5)


def test_load_data_names_what_is_missing(tmp_path):
    subjects = pd.DataFrame({"subject_id": ["a", "b"], "split": ["train", "test"], "time_days": [3, 4]})
    fake = types.SimpleNamespace(subjects=subjects, root=tmp_path, name="mine", tables={},
                                 manifest=types.SimpleNamespace(id_column="subject_id"))
    with pytest.raises(ValueError, match=r"subjects.csv.*\['site', 'event'\]"):
        p4.load_data(fake, PROF)
    fake.subjects = subjects.assign(site="internal", event=[1, 1], split=["train", "holdout"])
    with pytest.raises(ValueError, match="'holdout'"):
        p4.load_data(fake, PROF)


def test_balance_outcomes_keep_the_subjects_and_reproduce_the_cohort(tmp_path):
    from mmlib.cohorts import generate

    cohort = generate("ct_ehr", "smoke", seed=3, data_dir=tmp_path, show_progress=False)
    data = p4.load_data(cohort, p4.PROFILES.get_profile("smoke"))
    out = p4.balance_outcomes(data, [0.0, 0.5, 1.0])
    assert np.array_equal(out[0.5]["time_days"].to_numpy(), data.table["time_days"].to_numpy())
    assert np.array_equal(out[0.5]["event"].to_numpy(), data.table["event"].to_numpy())
    assert not np.array_equal(out[0.0]["time_days"].to_numpy(), out[1.0]["time_days"].to_numpy())
    data.latents.loc[0, "u_img"] += 1.0
    with pytest.raises(ValueError, match="u_img"):
        p4.balance_outcomes(data, [0.0])
    data.record = {}
    with pytest.raises(ValueError, match="generated"):
        p4.balance_outcomes(data, [0.0])


def _sweep(gains_mid: float, gains_end: float, lower_end: float) -> pd.DataFrame:
    rows = []
    for share in (0.0, 0.5, 1.0):
        g = gains_mid if share == 0.5 else gains_end
        lo = 0.01 if share == 0.5 else lower_end
        for site in ("internal", "external"):
            rows.append({"image_share": share, "site": site, "model": "CT only", "family": "unimodal", "strategy": "ct",
                         "c_index": 0.7, "best_unimodal": "CT only", "best_unimodal_c": 0.7})
            for s in ("late fusion", "contrastive"):
                rows.append({"image_share": share, "site": site, "model": f"{s} · FM", "family": "fusion",
                             "strategy": s, "c_index": 0.7 + g, "best_unimodal": "CT only", "best_unimodal_c": 0.7,
                             "gain": g, "gain_lower": lo, "gain_upper": g + 0.05, "p_value": 0.01})
    return pd.DataFrame(rows)


def test_claims_follow_the_numbers(both_trained):
    _, _, _, table = both_trained
    good = p4.claims_table(table, _sweep(0.04, 0.0, -0.03), image_share=0.5).set_index("claim")
    bad = p4.claims_table(table, _sweep(0.0, 0.04, 0.01), image_share=0.5).set_index("claim")
    balance = "the benefit of fusion depends on the balance of the modalities' information"
    noise = ("when one modality carries nothing, fusion does not beat the informative unimodal model beyond noise")
    assert good.loc[balance, "held"] == "yes" and bad.loc[balance, "held"] == "no"
    assert good.loc[noise, "held"] == "yes" and bad.loc[noise, "held"] == "no"
    late = [c for c in good.index if c.startswith("late fusion beats")]
    assert good.loc[late[0], "held"] == "yes"
    summary = p4.sweep_summary(_sweep(0.04, 0.0, -0.03))
    assert summary.loc[(summary["image share"] == 0.5) & (summary["site"] == "internal"),
                       "fusion models with CI > 0"].item() == "2/2"


def test_risk_group_figure_names_every_group_size_and_skips_a_log_rank_test_on_a_near_empty_group():
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    split = np.array(["train"] * 300 + ["test"] * 90 + ["external"] * 60)
    risk = np.r_[rng.normal(size=390), rng.normal(5.0, 0.1, size=59), -5.0]  # the external site shifted: all high but one
    data = SimpleNamespace(index=lambda s: np.flatnonzero(split == s))
    trained = SimpleNamespace(risk={"late fusion": risk}, event=rng.random(450) < 0.4,
                              time=rng.uniform(1, 365, size=450))
    fig = p4.risk_group_figure(trained, data, "late fusion")
    internal, external = (ax.get_title() for ax in fig.axes[:2])
    assert "log-rank chi2" in internal and "n low / intermediate / high = " in internal
    assert "n low / intermediate / high = 1 / 0 / 59" in external
    assert "no log-rank test" in external and "chi2" not in external
    plt.close(fig)


def test_cindex_forest_legend_sits_below_every_row_and_names_the_families():
    import matplotlib.pyplot as plt

    models = [("CT only", "unimodal"), ("EHR only", "unimodal"), ("late fusion", "fusion"), ("cross-attention", "fusion")]
    table = pd.DataFrame({"model": [m for m, _ in models], "family": [f for _, f in models],
                          "internal c": [0.62, 0.66, 0.70, 0.69], "internal 95% CI": ["0.55-0.69", "0.60-0.72",
                                                                                      "0.64-0.76", "0.63-0.75"],
                          "external c": [0.58, 0.61, 0.64, 0.50], "external 95% CI": ["0.50-0.66", "0.53-0.69",
                                                                                      "0.57-0.71", "0.42-0.58"]})
    table.attrs["best_unimodal"] = "EHR only"
    fig = p4.cindex_figure(table)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not any(ax.get_legend() for ax in fig.axes)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:2] == ["unimodal model", "fusion model"] and "EHR only" in labels[2]
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:  # wholly below each panel's lowest point (and its x-axis label)
        assert box.y1 <= ax.get_tightbbox(renderer).y0 + 1
    plt.close(fig)


def test_balance_figure_keeps_strategy_colours_apart_from_the_unimodal_curves():
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    rows = []
    for site in ("internal", "external"):
        for share in (0.0, 0.5, 1.0):
            for s in p4.STRATEGIES:
                rows.append({"family": "fusion", "strategy": s, "model": s, "site": site, "image_share": share,
                             "gain": 0.01, "gain_lower": -0.01, "gain_upper": 0.03, "c_index": 0.7})
            for model, family in (("CT only", "unimodal"), ("EHR only", "unimodal"), ("u_img (planted)", "planted"),
                                  ("z_ehr (planted)", "planted")):
                rows.append({"family": family, "strategy": None, "model": model, "site": site, "image_share": share,
                             "gain": np.nan, "gain_lower": np.nan, "gain_upper": np.nan, "c_index": 0.5 + share / 4})
    fig = p4.balance_figure(pd.DataFrame(rows))
    top = {mcolors.to_hex(line.get_color()) for ax in fig.axes[:2] for line in ax.get_lines() if line.get_marker() == "o"}
    bottom = {mcolors.to_hex(line.get_color()) for ax in fig.axes[2:] for line in ax.get_lines()
              if line.get_linestyle() != "-" or line.get_marker() == "o"}
    assert len(top) == len(p4.STRATEGIES) and len(bottom) == 2 and not top & bottom
    plt.close(fig)


def test_encoder_figure_marks_the_epoch_that_is_kept():
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    val = [0.30, 0.27, 0.26, 0.262, 0.27, 0.28]  # best at the third epoch, then overfitting
    best = [True, True, True, False, False, False]
    hist = pd.DataFrame({"epoch": range(6), "train_loss": np.linspace(0.4, 0.2, 6), "val_loss": val, "best": best})
    fig = p4.encoder_figure(SimpleNamespace(ct_history=hist, ehr_history=hist.drop(columns="best")))
    kept = [line for line in fig.axes[0].get_lines() if str(line.get_label()).startswith("kept")]
    assert len(kept) == 1 and list(kept[0].get_xdata()) == [3, 3] and "epoch 3" in kept[0].get_label()
    assert not any(str(line.get_label()).startswith("kept") for line in fig.axes[1].get_lines())  # no flags: no mark
    plt.close(fig)
