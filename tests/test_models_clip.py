"""P1 networks (mmlib.models.clip): shapes, pooling, missingness, attention wiring, ensemble, paper sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmlib.models.clip import (
    EnsembleClassifier,
    ImageTabularCLIP,
    InteractionModule,
    ProjectionHead,
    ResNet3dEncoder,
    TabularEncoder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAN = float("nan")
# Tiny sizes: the architectures are the paper's, only narrower and shallower.
RES = dict(widths=(4, 4, 8, 8), layers=(1, 1, 1, 1))  # bottleneck: out_features = 4 * 8 = 32
CATS = (2, 3, 4)
N_CONT = 2
TINY = dict(n_categories=CATS, n_continuous=N_CONT, hidden=16, proj_dim=8, interaction_dim=16,
            interaction_layers=2, interaction_heads=2, **RES)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch(b: int = 3, spatial=(32, 32, 64)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cat = torch.stack([torch.randint(-1, n, (b,), generator=g) for n in CATS], dim=1)
    cont = torch.randn(b, N_CONT, generator=g)
    cont[0, 1] = NAN
    return {"image": torch.randn(b, 1, *spatial, generator=g), "categorical": cat, "continuous": cont}


# --------------------------------------------------------------------------- image encoder


def test_resnet3d_encoder_tokens_are_the_last_stage_and_features_their_mean():
    torch.manual_seed(0)
    for stride, grid in [(2, (1, 1, 2)), (1, (2, 2, 4))]:
        enc = ResNet3dEncoder(conv1_stride=stride, **RES).eval()
        assert enc.out_features == 32
        seen = {}
        handle = enc.gradcam_layer.register_forward_hook(lambda m, i, o: seen.update(fmap=o.detach().clone()))
        with torch.no_grad():
            out = enc(torch.randn(2, 1, 32, 32, 64))
        handle.remove()
        assert seen["fmap"].shape == (2, 32, *grid)
        assert out["tokens"].shape == (2, math.prod(grid), 32)
        assert out["features"].shape == (2, 32)
        # tokens: the last stage's map flattened over space, row-major; features: their mean
        torch.testing.assert_close(out["tokens"], seen["fmap"].flatten(2).transpose(1, 2))
        torch.testing.assert_close(out["features"], out["tokens"].mean(dim=1), rtol=1e-5, atol=1e-6)
        assert out["tokens"].std(dim=1).max() > 0  # the tokens are not all equal (pooling is not trivial)


def test_resnet3d_encoder_rejects_bad_input_and_sizes():
    enc = ResNet3dEncoder(**RES)
    with pytest.raises(ValueError, match=r"\(2, 2, 32, 32, 32\)"):
        enc(torch.randn(2, 2, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 32\)"):
        enc(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="four positive"):
        ResNet3dEncoder(widths=(4, 4, 8), layers=(1, 1, 1))


def test_gradcam_layer_receives_gradients_from_the_embedding():
    torch.manual_seed(0)
    model = ImageTabularCLIP(**TINY).eval()
    assert model.gradcam_layer is model.image_encoder.layer4
    store = {}

    def hook(module, inputs, output):
        store["act"] = output
        output.register_hook(lambda g: store.update(grad=g))

    handle = model.gradcam_layer.register_forward_hook(hook)
    out = model(_batch())
    handle.remove()
    out["image_embedding"][:, 0].sum().backward()
    assert store["grad"].shape == store["act"].shape == (3, 32, 1, 1, 2)
    assert store["grad"].abs().sum() > 0


# --------------------------------------------------------------------------- tabular encoder


def test_featurize_one_hot_layout_with_missing_level_and_indicators():
    enc = TabularEncoder((2, 3), 2, hidden=8)
    cat = torch.tensor([[1, -1], [-1, 0]])
    cont = torch.tensor([[0.5, NAN], [0.0, -2.0]])
    x = enc.featurize(cat, cont)
    #                 f0 (2+missing)  f1 (3+missing)   values     missing bits
    expect = torch.tensor([[0, 1, 0, 0, 0, 0, 1, 0.5, 0.0, 0, 1],
                           [0, 0, 1, 1, 0, 0, 0, 0.0, -2.0, 0, 0]])
    assert enc.in_features == 11
    torch.testing.assert_close(x, expect)


@pytest.mark.parametrize("mode", ["onehot", "embedding"])
def test_tabular_encoder_nan_is_finite_and_differs_from_an_observed_zero(mode):
    torch.manual_seed(0)
    enc = TabularEncoder(CATS, N_CONT, hidden=16, categorical=mode, embedding_dim=3).eval()
    cat = torch.tensor([[0, 1, 2]] * 3)
    cont = torch.tensor([[NAN, 1.0], [0.0, 1.0], [0.7, 1.0]])  # missing, observed 0 (the imputed value), other
    with torch.no_grad():
        y = enc(cat, cont)
    assert y.shape == (3, 16)
    assert torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # only the indicator tells "missing" from "observed 0"
    assert not torch.allclose(y[0], y[2])
    if mode == "embedding":
        assert enc.in_features == 3 * 3 + 2 * N_CONT


@pytest.mark.parametrize("mode", ["onehot", "embedding"])
def test_tabular_encoder_missing_category_differs_from_every_level(mode):
    torch.manual_seed(0)
    enc = TabularEncoder(CATS, N_CONT, hidden=16, categorical=mode).eval()
    col = 2  # 4 observed levels
    cat = torch.tensor([[0, 0, c] for c in (-1, 0, 1, 2, 3)])
    cont = torch.zeros(5, N_CONT)
    with torch.no_grad():
        y = enc(cat, cont)
    assert torch.isfinite(y).all()
    for level in range(1, 5):
        assert not torch.allclose(y[0], y[level]), f"missing == level {level - 1} of column {col}"


def test_tabular_encoder_rejects_bad_codes_and_shapes():
    enc = TabularEncoder(CATS, N_CONT, hidden=8)
    cont = torch.zeros(2, N_CONT)
    with pytest.raises(ValueError, match=r"column 1 has code 3 .*\[-1, 2\]"):
        enc(torch.tensor([[0, 0, 0], [1, 3, 0]]), cont)
    with pytest.raises(ValueError, match="column 0 has code -2"):
        enc(torch.tensor([[-2, 0, 0], [1, 0, 0]]), cont)
    with pytest.raises(ValueError, match=r"categorical of shape \(B, 3\), got \(2, 4\)"):
        enc(torch.zeros(2, 4, dtype=torch.long), cont)
    with pytest.raises(ValueError, match=r"continuous of shape \(B, 2\), got \(2, 3\)"):
        enc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="different batch sizes"):
        enc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, N_CONT))
    with pytest.raises(ValueError, match="continuous column 1 has value inf"):
        enc(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0.0, 0.0], [0.0, math.inf]]))
    with pytest.raises(TypeError, match="integer"):
        enc(torch.zeros(2, 3), cont)
    with pytest.raises(ValueError, match="onehot"):
        TabularEncoder(CATS, N_CONT, categorical="ordinal")


def test_tabular_encoder_with_one_kind_of_field_only():
    enc = TabularEncoder((), 3, hidden=8).eval()
    assert enc(None, torch.tensor([[1.0, NAN, 0.0]])).shape == (1, 8)
    enc = TabularEncoder((2,), 0, hidden=8).eval()
    assert enc(torch.tensor([[-1]]), None).shape == (1, 8)


# --------------------------------------------------------------------------- heads and fusion


def test_projection_head_structure_and_shape():
    head = ProjectionHead(12, 10, 4)
    assert [type(m) for m in head.net] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert head(torch.randn(5, 12)).shape == (5, 4)
    assert ProjectionHead(12).net[0].out_features == 12  # hidden defaults to the input width
    with pytest.raises(ValueError, match=r"\(B, 12\), got \(5, 11\)"):
        head(torch.randn(5, 11))


def test_interaction_attends_to_image_tokens():
    torch.manual_seed(0)
    mod = InteractionModule(image_dim=12, tabular_dim=10, dim=16, layers=2, heads=4).eval()
    tokens, tab = torch.randn(2, 5, 12), torch.randn(2, 10)
    with torch.no_grad():
        out, att = mod(tokens, tab, return_attention=True)
        assert out.shape == (2, 16)
        torch.testing.assert_close(mod(tokens, tab), out)
        assert len(att) == 2
        for a in att:
            assert a.shape == (2, 4, 1, 5)
            torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 1))
            assert (a >= 0).all()
        changed = tokens.clone()
        changed[0, 3] += 1.0  # one image token of sample 0
        out2 = mod(changed, tab)
    assert not torch.allclose(out2[0], out[0], atol=1e-4)  # cross-attention is wired
    torch.testing.assert_close(out2[1], out[1])  # and does not mix samples
    with pytest.raises(ValueError, match=r"image_tokens of shape \(B, N, 12\), got \(2, 12\)"):
        mod(tokens[:, 0], tab)
    with pytest.raises(ValueError, match="different batch sizes"):
        mod(tokens, tab[:1])
    with pytest.raises(ValueError, match="divisible"):
        InteractionModule(12, 10, dim=18, heads=4)


def test_ensemble_logits_are_the_mean_of_three_linear_heads():
    torch.manual_seed(0)
    ens = EnsembleClassifier(image_dim=6, tabular_dim=5, dim=4, n_classes=3)
    xi, xt, xm = torch.randn(7, 6), torch.randn(7, 5), torch.randn(7, 4)
    out = ens(xi, xt, xm)
    heads = {"image": F.linear(xi, ens.image.weight, ens.image.bias),
             "tabular": F.linear(xt, ens.tabular.weight, ens.tabular.bias),
             "multimodal": F.linear(xm, ens.multimodal.weight, ens.multimodal.bias)}
    for k, v in heads.items():
        assert out[k].shape == (7, 3)
        torch.testing.assert_close(out[k], v, rtol=0, atol=0)
    torch.testing.assert_close(out["logits"], (heads["image"] + heads["tabular"] + heads["multimodal"]) / 3)
    assert torch.equal(out["logits"], torch.stack([out["image"], out["tabular"], out["multimodal"]]).mean(0))
    with pytest.raises(ValueError, match="multimodal"):
        ens(xi, xt, torch.randn(7, 5))


# --------------------------------------------------------------------------- the pretraining model


def test_clip_model_shapes_fuse_and_keys():
    torch.manual_seed(0)
    model = ImageTabularCLIP(**TINY).eval()
    with torch.no_grad():
        out = model(_batch())
        fused = model.fuse(out["image_tokens"], out["tabular_features"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image_features": (3, 32), "image_tokens": (3, 2, 32), "tabular_features": (3, 16),
        "image_embedding": (3, 8), "tabular_embedding": (3, 8),
    }
    assert all(torch.isfinite(v).all() for v in out.values())  # row 0 has a NaN continuous value
    assert fused.shape == (3, 16)
    b = _batch()
    del b["continuous"]
    with pytest.raises(KeyError, match="continuous"):
        model(b)


def test_clip_model_eval_is_batch_independent():
    torch.manual_seed(0)
    model = ImageTabularCLIP(**TINY).eval()
    batch = _batch(3)
    with torch.no_grad():
        full = model(batch)
        fused = model.fuse(full["image_tokens"], full["tabular_features"])
        for i in range(3):
            one = model({k: v[i : i + 1] for k, v in batch.items()})
            for k in full:
                torch.testing.assert_close(one[k], full[k][i : i + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model.fuse(one["image_tokens"], one["tabular_features"]), fused[i : i + 1],
                                       rtol=1e-4, atol=1e-5)


def test_clip_model_trains_every_parameter():
    torch.manual_seed(0)
    model = ImageTabularCLIP(**TINY).train()
    out = model(_batch(4))
    fused = model.fuse(out["image_tokens"], out["tabular_features"])
    (out["image_embedding"].sum() + out["tabular_embedding"].sum() + fused.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    # freezing-schedule hooks name the image encoder's stages
    assert model.encoder_stages()[-1] == "image_encoder.layer4"
    assert model.stage_modules("image_encoder.layer4") == [model.gradcam_layer]


def test_paper_parameter_counts():
    with torch.device("meta"):
        resnet = ResNet3dEncoder()
        # 29 binary categorical fields + 18 continuous (the public code's field counts)
        tabular = TabularEncoder([2] * 29, 18)
        proj = ProjectionHead(2048, 2048, 128)
        inter = InteractionModule(2048, 2048)
        model = ImageTabularCLIP(n_categories=[2] * 29, n_continuous=18)
    # MONAI 3D ResNet-50, 1 channel, no fc: ~46.2M (P1's image encoder)
    assert resnet.out_features == 2048
    assert _n_params(resnet) == 46_158_912
    # one-hot with a missing level (29 * 3) + 18 values + 18 missing bits = 123 inputs
    assert tabular.in_features == 29 * 3 + 2 * 18 == 123
    assert _n_params(tabular) == (123 * 2048 + 2048) + 2 * 2048 + (2048 * 2048 + 2048) == 4_454_400
    assert _n_params(proj) == (2048 * 2048 + 2048) + (2048 * 128 + 128) == 4_458_624
    d = 256
    block = 3 * 2 * d + 2 * (3 * d * d + 3 * d + d * d + d) + (d * 4 * d + 4 * d + 4 * d * d + d)
    assert _n_params(inter) == 2 * (2048 * d + d) + 2 * d + 2 * block + 2 * d == 3_156_992
    assert _n_params(model) == _n_params(resnet) + _n_params(tabular) + 2 * _n_params(proj) + _n_params(inter)
