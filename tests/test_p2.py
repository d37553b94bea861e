"""P2 pipeline pieces that the notebook's smoke run does not pin down by value."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmlib.pipelines import p2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table():
    return pd.DataFrame({
        "subject_id": ["a", "b", "c", "d"], "age": [60.0, 70.0, 80.0, 70.0], "gender": ["M", "F", "m", "F"],
        "chd": [1, 0, 0, 1], "pad": [0, 0, 1, 1],
    })


def test_tabular_inputs_encode_age_z_gender_two_bits_chd_pad():
    x = p2.tabular_inputs(_table())
    assert x.shape == (4, 5) and x.dtype == np.float32
    age = np.array([60.0, 70.0, 80.0, 70.0])
    np.testing.assert_allclose(x[:, 0], (age - age.mean()) / age.std(), rtol=1e-6)
    np.testing.assert_array_equal(x[:, 1], [1, 0, 1, 0])  # male bit
    np.testing.assert_array_equal(x[:, 2], [0, 1, 0, 1])  # female bit
    np.testing.assert_array_equal(x[:, 1] + x[:, 2], 1)
    np.testing.assert_array_equal(x[:, 3:], [[1, 0], [0, 0], [0, 1], [1, 1]])


def test_tabular_inputs_name_bad_columns():
    with pytest.raises(ValueError, match="gender"):
        p2.tabular_inputs(_table().assign(gender=["M", "X", "F", "F"]))
    with pytest.raises(ValueError, match="pad"):
        p2.tabular_inputs(_table().drop(columns="pad"))
    with pytest.raises(ValueError, match="age"):
        p2.tabular_inputs(_table().assign(age=70.0))


def test_contribution_groups_cover_the_five_inputs_once_with_gender_together():
    cols = [c for key, cs in p2.GROUPS.values() if key == "tabular" for c in cs]
    assert sorted(cols) == list(range(len(p2.TABULAR_INPUTS)))
    assert p2.GROUPS["gender"] == ("tabular", [1, 2])
    assert p2.GROUPS["vision"] == ("image", None)


@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
def test_profiles_build_models_that_fit_their_grid(profile):
    prof = p2.PROFILES[profile]
    assert all(s % 32 == 0 and s % prof.vit_patch == 0 for s in prof.spatial_size)
    assert list(prof.unfreeze_epochs) == sorted(prof.unfreeze_epochs) and max(prof.unfreeze_epochs) < prof.finetune_epochs
    with torch.device("meta"):
        for kind in ("ResNetAutoEnc", "ViTAutoEnc", "ResNetMLP", "ViTMLP"):
            p2.build_model(kind, prof)


def test_full_profile_uses_the_paper_sizes_and_schedule():
    f = p2.PROFILES["full"]
    assert f.spatial_size == (224, 224, 320) and f.spacing_mm == (1.0, 1.0, 1.0)
    assert f.resnet_widths == (64, 128, 256, 512) and f.resnet_layers == (3, 4, 6, 3)
    assert (f.vit_patch, f.vit_hidden, f.vit_mlp, f.vit_layers, f.vit_heads) == (16, 768, 3072, 8, 8)
    assert (f.pretrain_epochs, f.pretrain_lr, f.pretrain_batch) == (300, 1e-4, 1)
    assert f.finetune_epochs == 250 and f.unfreeze_epochs == (50, 100, 150)
    assert f.occlusion_mask == (8, 8, 10)
    # 224 x 224 x 320 / (8 x 8 x 10) = the paper's 25,088 occlusion forward passes
    assert np.prod([s // m for s, m in zip(f.spatial_size, f.occlusion_mask)]) == 25_088


def test_claims_table_reports_what_the_numbers_say():
    summary = pd.DataFrame([
        {"backbone": b, "setup": s, "test AUC": auc, "vision": vis}
        for b, s, auc, vis in [
            ("ResNetMLP", "from scratch", 0.55, 0.80), ("ResNetMLP", "pretrained frozen", 0.65, 0.93),
            ("ResNetMLP", "pretrained progressive", 0.71, 0.92), ("ViTMLP", "from scratch", 0.72, 0.001),
            ("ViTMLP", "pretrained frozen", 0.74, 0.28), ("ViTMLP", "pretrained progressive", 0.73, 0.05),
        ]
    ])
    hist = pd.DataFrame({"model": ["ResNetAutoEnc", "ViTAutoEnc"], "val_loss": [0.05, 0.03]})
    held = p2.claims_table(summary, hist, {}).set_index("claim")["held"]
    assert (held == "yes").all(), held  # the paper's own numbers satisfy every claim
    summary.loc[summary["setup"] == "from scratch", "vision"] = 0.99  # scratch uses the image most
    held = p2.claims_table(summary, hist.assign(val_loss=[0.03, 0.05]), {}).set_index("claim")["held"]
    assert held["pretraining raises the vision contribution (ResNetMLP)"] == "no"
    assert held["the ViT trained from scratch collapses onto the tabular data"] == "no"
    assert held["the ViTAutoEnc reconstructs better than the ResNetAutoEnc (Figure 4)"] == "no"
    # with paired CIs, an AUC lead must clear 0 to count (the paper's own numbers lead; these CIs decide)
    diffs = {"ViTMLP: frozen - progressive": (0.01, -0.05, 0.07), "ResNetMLP: progressive - frozen": (0.06, 0.01, 0.11),
             "ResNetMLP: progressive - scratch": (0.16, -0.01, 0.3), "ViTMLP: frozen - scratch": (0.02, 0.005, 0.04)}
    held = p2.claims_table(summary, hist, diffs).set_index("claim")["held"]
    assert held["frozen suits the well-pretrained encoder: ViT frozen > ViT progressive (test AUC)"].startswith("partly")
    assert held["progressive unfreezing suits the weaker encoder: ResNet progressive > ResNet frozen (test AUC)"] == "yes"
    assert held["the best pretrained ResNetMLP beats ResNetMLP from scratch (test AUC)"].startswith("partly")
    assert held["the best pretrained ViTMLP beats ViTMLP from scratch (test AUC)"] == "yes"


def test_dead_vision_features_counts_relus_that_never_fire():
    prof = p2.PROFILES["smoke"]
    n = 6
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "split": ["test"] * n, "pretrain_split": ["val"] * n,
                          "rfs_days": [100.0] * n})
    data = p2.P2Data(table=table, images=torch.rand(n, 1, *prof.spatial_size).half(), tabular=torch.zeros(n, 5),
                     masks=None, spacing_mm=prof.spacing_mm)
    models = {}
    for b in p2.BACKBONES:
        for st in p2.SETUPS:
            torch.manual_seed(0)
            m = p2.build_model(b, prof)
            linear = m.vision_head[-2]
            with torch.no_grad():
                if st == "from scratch":  # every output pushed far below zero: the ReLU never fires
                    linear.bias.fill_(-1e6)
                else:  # every output pushed far above zero: always active
                    linear.bias.fill_(1e6)
            models[(b, st, 0)] = m
    ft = p2.FineTuned(models=models, evals={}, history=pd.DataFrame(), load_reports=[], seeds=[0])
    dead = p2.dead_vision_features(ft, data, device=torch.device("cpu")).set_index(["backbone", "setup"])
    for b in p2.BACKBONES:
        assert dead.loc[(b, "from scratch"), "always zero"] == dead.loc[(b, "from scratch"), "features"] == 4
        assert dead.loc[(b, "pretrained frozen"), "always zero"] == 0


def test_occlusion_study_scores_every_setup_and_flags_a_constant_image_branch():
    prof = p2.PROFILES["smoke"].replace(occlusion_cases=2)
    n = 4
    ids = [f"s{i}" for i in range(n)]
    table = pd.DataFrame({"subject_id": ids, "split": ["test"] * n, "pretrain_split": ["val"] * n,
                          "rfs_days": [100.0, 200.0, 3000.0, 300.0], "label": [1.0, 1.0, 0.0, 1.0]})
    masks = torch.zeros(n, *prof.spatial_size, dtype=torch.uint8)
    masks[:, 2:6, 2:6, 4:10] = 1
    data = p2.P2Data(table=table, images=torch.rand(n, 1, *prof.spatial_size).half(), tabular=torch.zeros(n, 5),
                     masks=masks, spacing_mm=prof.spacing_mm)
    models, evals = {}, {}
    for b in p2.BACKBONES:
        for k, st in enumerate(p2.SETUPS):
            torch.manual_seed(k)
            m = p2.build_model(b, prof).eval()
            if (b, st) == ("ViTMLP", "from scratch"):
                with torch.no_grad():
                    m.vision_head[-2].bias.fill_(-1e6)  # image branch constant
            models[(b, st, 0)] = m
            vis = 0.0 if (b, st) == ("ViTMLP", "from scratch") else 0.5
            evals[(b, st, 0)] = {
                "test AUC": 0.5 + 0.1 * k,
                "predictions": pd.DataFrame({"subject_id": ids, "rfs_pred_days": [10.0] * n}),
                "per_sample": pd.DataFrame({"subject_id": ids, **{g: [0.2] * n for g in p2.GROUPS}}),
                "contribution": pd.Series({g: (vis if g == "vision" else (1 - vis) / 4) for g in p2.GROUPS}),
            }
    ft = p2.FineTuned(models=models, evals=evals, history=pd.DataFrame(), load_reports=[], seeds=[0])
    occ = p2.occlusion_study(ft, data, prof, device=torch.device("cpu"))
    s = occ.localisation_summary.set_index(["backbone", "setup"])
    assert len(s) == len(p2.BACKBONES) * len(p2.SETUPS)
    # the constant branch: flagged, nothing scored; every other setup: the first relapses by id
    assert s.loc[("ViTMLP", "from scratch"), "cases"] == 0
    assert "constant" in s.loc[("ViTMLP", "from scratch"), "note"]
    live = s.drop(index=("ViTMLP", "from scratch"))
    assert (live["cases"] == min(prof.occlusion_cases, 3)).all()
    assert ((live["mass_on_plaque"] >= 0) & (live["mass_on_plaque"] <= 1)).all()
    scored = occ.localisation.groupby(["backbone", "setup"])["subject_id"].apply(list)
    assert all(v == ["s0", "s1", "s3"][: prof.occlusion_cases] for v in scored)
    # Table 4 rows: scratch and best (highest test AUC = pretrained progressive) per backbone, plus the paper's
    t4 = occ.table4[occ.table4["source"] == "this run"]
    assert set(t4["setup"]) == {"from scratch", "pretrained progressive"}
    # the verdict names every scored setup, best ratio first, and the constant one as not scored
    verdict = p2.localisation_verdict(occ.localisation_summary).splitlines()
    best = live["ratio_to_chance"].idxmax()
    assert verdict[1].startswith(f"- {best[0]} · {best[1]} ")
    assert f"{live.loc[best, 'ratio_to_chance']:.1f}x chance" in verdict[1]
    assert verdict[-1] == "- ViTMLP · from scratch: not scored (image branch constant: the map is round-off)"
    assert len(verdict) == 1 + len(s)


def test_fast_profile_switches_sdpa_and_channels_last_and_nothing_else():
    from monai.networks.blocks.selfattention import SABlock

    smoke = p2.PROFILES.get_profile("smoke")
    assert smoke.fast  # on by default
    torch.manual_seed(0)
    fast_vit = p2.build_model("ViTAutoEnc", smoke)
    torch.manual_seed(0)
    plain_vit = p2.build_model("ViTAutoEnc", p2.PROFILES.get_profile("smoke", fast=False))
    flags = [b.use_flash_attention for b in fast_vit.modules() if isinstance(b, SABlock)]
    assert flags and all(flags)
    assert not any(b.use_flash_attention for b in plain_vit.modules() if isinstance(b, SABlock))
    sd_fast, sd_plain = fast_vit.state_dict(), plain_vit.state_dict()
    assert list(sd_fast) == list(sd_plain) and all(torch.equal(sd_fast[k], sd_plain[k]) for k in sd_fast)
    conv = next(m for m in p2.build_model("ResNetAutoEnc", smoke).modules()
                if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and max(m.kernel_size) > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
    x = torch.rand(2, 1, *smoke.spatial_size)
    with torch.no_grad():
        torch.testing.assert_close(fast_vit.eval()(x), plain_vit.eval()(x), rtol=1e-5, atol=1e-5)


def test_compile_is_off_by_default_and_compiles_in_place_when_asked():
    smoke = p2.PROFILES.get_profile("smoke")
    assert not smoke.compile and not p2.PROFILES.get_profile("full").compile
    assert p2.build_model("ResNetAutoEnc", smoke)._compiled_call_impl is None
    compiled = p2.build_model("ResNetAutoEnc", p2.PROFILES.get_profile("smoke", compile=True))
    assert compiled._compiled_call_impl is not None  # lazy: nothing is compiled until the first call
    assert list(compiled.state_dict()) == list(p2.build_model("ResNetAutoEnc", smoke).state_dict())


def test_train_cli_applies_profile_overrides_and_names_unknown_fields(capsys):
    from mmlib.__main__ import main
    from mmlib.train_cli import resolve_profile

    prof = resolve_profile("p2", "full", {"compile": True, "precision": "bf16"})
    assert prof.compile and prof.precision == "bf16" and prof.name == "full"
    assert resolve_profile("p2", "full") == p2.PROFILES.get_profile("full")
    assert main(["train", "p2", "--profile", "smoke", "--set", "compiled=True", "--data-dir", "unused"]) == 2
    assert "compiled" in capsys.readouterr().err  # the unknown field is named before anything runs


def test_data_held_on_a_device_serves_batches_there():
    # P2Data.to keeps the float16 volumes where the model runs; on the CPU it is a no-op. The "meta"
    # device stands in for a GPU here: the same branch, no storage.
    n = 5
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "rfs_days": np.arange(n, dtype=float) * 100})
    images = torch.rand(n, 1, 8, 8, 8).half()
    data = p2.P2Data(table=table, images=images, tabular=torch.arange(n * 5.0).reshape(n, 5), masks=None,
                     spacing_mm=(1.0, 1.0, 1.0))
    assert data.to("cpu") is data
    host = data.batch([3, 1])
    torch.testing.assert_close(host["image"], images[[3, 1]].float())
    torch.testing.assert_close(host["target"], torch.tensor([300.0, 100.0]) / p2.RFS_SCALE_DAYS)
    moved = data.to("meta")
    assert moved is not data and data.images.device.type == "cpu"  # the host copy is untouched
    assert moved.images.dtype == torch.float16 and moved.table is data.table
    dev = moved.batch([3, 1])
    assert {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in dev.items()} == {
        k: ("meta", v.dtype, tuple(v.shape)) for k, v in host.items()}


def test_finetune_history_has_no_validation_column_and_keeps_the_last_epoch():
    """The paper keeps no validation split in fine-tuning: the history carries the training loss per
    epoch, and the checkpoint kept ("best") is the last epoch's."""
    prof = p2.PROFILES["smoke"].replace(finetune_epochs=2)
    n = 4
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "split": ["train"] * n,
                          "pretrain_split": ["train"] * n, "rfs_days": [100.0, 200.0, 3000.0, 300.0]})
    data = p2.P2Data(table=table, images=torch.rand(n, 1, *prof.spatial_size).half(), tabular=torch.zeros(n, 5),
                     masks=None, spacing_mm=prof.spacing_mm)
    _, hist, report = p2.finetune("ResNetMLP", "from scratch", data, prof, encoder_ckpt=None,
                                  device=torch.device("cpu"), seed=0)
    assert report == "" and list(hist["epoch"]) == [0, 1]
    assert "val_loss" not in hist and hist.notna().all().all()
    assert list(hist.columns[:4]) == ["backbone", "setup", "seed", "epoch"]
    assert np.isfinite(hist["train_loss"]).all() and list(hist["best"]) == [False, True]
