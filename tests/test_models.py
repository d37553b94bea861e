"""Networks of mmlib.models: shapes, input checks, MONAI equivalence, paper sizes, encoder sharing."""

import pytest
import torch

from mmlib.models import ResNetAutoEnc, ResNetMLP, ViTAutoEnc, ViTMLP

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Tiny sizes: the architectures are the paper's, only narrower and shallower.
RES = dict(widths=(4, 8, 16, 32), layers=(1, 1, 1, 1))
VIT = dict(img_size=(32, 32, 32), patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch(b: int = 2, spatial=(32, 32, 32), tabular: int = 5) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(b, 1, *spatial), "tabular": torch.randn(b, tabular)}


# --------------------------------------------------------------------------- autoencoders


def test_resnet_autoenc_returns_input_shape():
    torch.manual_seed(0)
    model = ResNetAutoEnc(**RES).eval()
    for shape in [(2, 1, 32, 32, 32), (1, 1, 32, 32, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            y = model(x)
        assert y.shape == x.shape


def test_resnet_autoenc_rejects_sizes_not_divisible_by_32():
    model = ResNetAutoEnc(**RES)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 2, 32, 32, 32))  # wrong channel count


def test_vit_autoenc_returns_input_shape():
    torch.manual_seed(0)
    for patch, img in [(16, (32, 32, 32)), (4, (8, 8, 12))]:
        model = ViTAutoEnc(**{**VIT, "img_size": img, "patch_size": patch}).eval()
        x = torch.randn(2, 1, *img)
        with torch.no_grad():
            assert model(x).shape == x.shape


def test_vit_autoenc_rejects_bad_patch_and_image_sizes():
    with pytest.raises(ValueError, match="square"):
        ViTAutoEnc(**{**VIT, "patch_size": 8})  # 32 divisible by 8, but 8 is not a square
    with pytest.raises(ValueError, match="divisible"):
        ViTAutoEnc(**{**VIT, "img_size": (32, 32, 40)})  # 40 not divisible by 16
    with pytest.raises(ValueError, match="divisible"):
        ViTAutoEnc(**{**VIT, "hidden_size": 30, "num_heads": 4})


def test_vit_autoenc_reproduces_monai_exactly():
    from monai.networks.nets import ViTAutoEnc as MonaiViTAutoEnc

    torch.manual_seed(0)
    sizes = dict(img_size=(32, 32, 32), patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)
    theirs = MonaiViTAutoEnc(
        in_channels=1, out_channels=1, deconv_chns=8, proj_type="conv", qkv_bias=False, spatial_dims=3, **sizes
    ).eval()
    ours = ViTAutoEnc(in_channels=1, deconv_chns=8, **sizes).eval()

    def rename(key: str) -> str:
        if key.startswith("conv3d_transpose_1."):
            return "decoder.1." + key.removeprefix("conv3d_transpose_1.")
        if key.startswith("conv3d_transpose."):
            return "decoder.0." + key.removeprefix("conv3d_transpose.")
        assert key.split(".")[0] in ("patch_embedding", "blocks", "norm"), key
        return "encoder." + key

    mapped = {rename(k): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(mapped, strict=True)  # strict: every key maps one to one
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected, _ = theirs(x)
        got = ours(x)
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- paper sizes


def test_paper_parameter_counts():
    with torch.device("meta"):
        resnet = ResNetMLP()
        vit = ViTMLP(img_size=(224, 224, 320))
    # P2: ResNetMLP ~63.6M parameters; the ViT's convolutional vision head ~5.75M.
    assert 63.4e6 <= _n_params(resnet) <= 63.6e6
    assert _n_params(vit.vision_head) == pytest.approx(5.75e6, abs=0.01e6)
    # the encoder's grid at the paper's size: 14 x 14 x 20 patches of 16^3
    assert vit.encoder.grid == (14, 14, 20)
    assert vit.encoder.patch_embedding.position_embeddings.shape == (1, 14 * 14 * 20, 768)


# --------------------------------------------------------------------------- encoders shared


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_autoencoder_and_finetuning_encoders_have_identical_state_dicts():
    for kw in [RES, dict(widths=(4, 8, 16, 32), layers=(2, 1, 1, 1), conv1_kernel=3)]:
        ae, mlp = ResNetAutoEnc(**kw), ResNetMLP(**kw)
        assert _shapes(ae.encoder) == _shapes(mlp.encoder)
        assert len(_shapes(ae.encoder)) > 0
    ae, mlp = ViTAutoEnc(**VIT), ViTMLP(**VIT)
    assert _shapes(ae.encoder) == _shapes(mlp.encoder)
    # and a different architecture is visibly different
    wider = ResNetMLP(widths=(4, 8, 16, 64), layers=(1, 1, 1, 1))
    assert _shapes(ResNetAutoEnc(**RES).encoder) != _shapes(wider.encoder)


# --------------------------------------------------------------------------- fine-tuning models


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_finetuning_models_forward_and_input_checks(kind):
    torch.manual_seed(0)
    model = (ResNetMLP(**RES) if kind == "resnet" else ViTMLP(**VIT)).eval()
    batch = _batch(3)
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {"rfs"}
    assert out["rfs"].shape == (3,)
    assert torch.isfinite(out["rfs"]).all()
    # each sample is processed independently (eval mode): the batch of one gives the same
    with torch.no_grad():
        one = model({"image": batch["image"][1:2], "tabular": batch["tabular"][1:2]})["rfs"]
    torch.testing.assert_close(one, out["rfs"][1:2], atol=1e-5, rtol=1e-5)

    with pytest.raises(KeyError, match="tabular"):
        model({"image": batch["image"]})
    with pytest.raises(KeyError, match="image"):
        model({"tabular": batch["tabular"]})
    with pytest.raises(ValueError, match="TabularMLP"):
        model({"image": batch["image"], "tabular": torch.randn(3, 4)})


def test_encoder_stages_and_stage_modules():
    resnet = ResNetMLP(**RES)
    assert resnet.encoder_stages() == ["encoder.stem", "encoder.layer1", "encoder.layer2", "encoder.layer3",
                                       "encoder.layer4"]
    stem = resnet.stage_modules("encoder.stem")
    assert stem[0] is resnet.encoder.conv1 and stem[1] is resnet.encoder.bn1 and len(stem) == 2
    assert resnet.stage_modules("encoder.layer3") == [resnet.encoder.layer3]

    vit = ViTMLP(**{**VIT, "num_layers": 3})
    assert vit.encoder_stages() == ["encoder.patch_embedding", "encoder.blocks.0", "encoder.blocks.1",
                                    "encoder.blocks.2"]
    assert vit.stage_modules("encoder.patch_embedding") == [vit.encoder.patch_embedding]
    assert vit.stage_modules("encoder.blocks.0") == [vit.encoder.blocks[0]]
    last = vit.stage_modules("encoder.blocks.2")
    assert last[0] is vit.encoder.blocks[2] and any(m is vit.encoder.norm for m in last)
    # every encoder parameter belongs to exactly one stage
    for model in (resnet, vit):
        ids = [id(p) for s in model.encoder_stages() for m in model.stage_modules(s) for p in m.parameters()]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.encoder.parameters()}
    # other paths fall through to submodules
    assert resnet.stage_modules("fusion") == [resnet.fusion]


def test_vit_head_max_pool_keeps_the_patient_differences_average_pool_loses():
    # After InstanceNorm + GELU each channel has zero mean / unit variance over space, so its
    # spatial average barely depends on the input; the maximum does. Same weights, two pools.
    torch.manual_seed(0)
    kw = {**VIT, "img_size": (64, 64, 64), "head_channels": (16, 8)}
    by_max, by_avg = ViTMLP(**kw, pool="max").eval(), ViTMLP(**kw, pool="avg").eval()
    by_avg.load_state_dict(by_max.state_dict())
    image = torch.randn(8, 1, 64, 64, 64) * torch.linspace(0.2, 3.0, 8).view(8, 1, 1, 1, 1)

    def pooled_spread(model: ViTMLP) -> float:
        with torch.no_grad():
            pooled = model.vision_head[:8](model.encoder.to_grid(model.encoder(image)))  # up to Flatten
        assert pooled.shape == (8, 8)
        return float(pooled.std(0).mean())

    assert pooled_spread(by_max) > 5 * pooled_spread(by_avg) > 0
    with pytest.raises(ValueError, match="pool"):
        ViTMLP(**VIT, pool="sum")
