"""P3 MoRE encoders (mmlib.models.more): DropKey and its schedules, X-ray ViT, ECG transformer, attention rollout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmlib.models.more import (
    DropKeyAttention,
    ECGTransformer,
    TransformerEncoder,
    XrayViT,
    attention_rollout,
    dropkey_schedule,
    rollout_map_2d,
    rollout_over_time,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_VIT = dict(image_size=32, patch_size=8, dim=32, depth=2, n_heads=4)
SMALL_ECG = dict(n_leads=12, n_samples=100, patch_size=5, dim=32, depth=2, n_heads=4)


def _attention(p: float, dim: int = 16, n_heads: int = 4, seed: int = 0) -> DropKeyAttention:
    torch.manual_seed(seed)
    return DropKeyAttention(dim, n_heads, p)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _off_diagonal(n: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)


class _PassThrough(nn.Module):
    """Stands in for the transformer, so the tokens are the embeddings (CLS + patches + positions)."""

    def forward(self, x, return_attention=False):
        return (x, []) if return_attention else x


# --------------------------------------------------------------------------- schedule


def test_dropkey_schedule_modes():
    assert dropkey_schedule(0.3, 4, "off") == [0.0] * 4
    assert dropkey_schedule(0.3, 4, "constant") == [0.3] * 4
    linear = dropkey_schedule(0.3, 4, "linear")
    assert linear == pytest.approx([0.075, 0.15, 0.225, 0.3])  # p (i + 1) / depth
    assert all(a < b for a, b in zip(linear, linear[1:]))
    assert linear[-1] == pytest.approx(0.3) and linear[0] > 0
    assert dropkey_schedule(0.3, 1, "linear") == pytest.approx([0.3])
    assert dropkey_schedule(0.0, 3, "linear") == [0.0] * 3


def test_dropkey_schedule_errors():
    with pytest.raises(ValueError, match="mode"):
        dropkey_schedule(0.3, 4, "cosine")
    with pytest.raises(ValueError, match="p must be"):
        dropkey_schedule(1.0, 4, "constant")
    with pytest.raises(ValueError, match="depth"):
        dropkey_schedule(0.3, 0, "constant")


@pytest.mark.parametrize("mode, expected", [("constant", [0.3, 0.3, 0.3]), ("linear", [0.1, 0.2, 0.3]),
                                            ("off", [0.0, 0.0, 0.0])])
def test_encoders_apply_the_schedule_per_block(mode, expected):
    for model in (XrayViT(**{**SMALL_VIT, "depth": 3}, dropkey=0.3, dropkey_mode=mode),
                  ECGTransformer(**{**SMALL_ECG, "depth": 3}, dropkey=0.3, dropkey_mode=mode)):
        rates = [block.attn.p for block in model.encoder.blocks]
        assert rates == pytest.approx(expected)
        assert model.encoder.dropkey_rates == pytest.approx(expected)


# --------------------------------------------------------------------------- DropKey attention


def test_eval_is_plain_attention_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    dropping = _attention(0.9).eval()
    plain = _attention(0.0).eval()
    plain.load_state_dict(dropping.state_dict())
    x = _x(3, 10, 16)
    with torch.no_grad():
        a, b, c = dropping(x), dropping(x), plain(x)
    assert len(calls) == 3
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic in eval
    torch.testing.assert_close(a, c, rtol=0, atol=0)  # p has no effect in eval
    with torch.no_grad():
        explicit, weights = dropping(x, return_attention=True)
    assert len(calls) == 3  # the weights come from the explicit path
    torch.testing.assert_close(explicit, a, rtol=1e-5, atol=1e-5)
    assert (weights > 0).all()  # nothing dropped in eval
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 10))


def test_explicit_path_with_p0_equals_sdpa_in_training(monkeypatch):
    attn = _attention(0.0).train()
    x = _x(2, 9, 16)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = attn(x)
    assert len(calls) == 1  # p = 0: nothing to drop, the fused kernel is used in training too
    explicit, weights = attn(x, return_attention=True)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    q, k, _ = attn.qkv(x).reshape(2, 9, 3, 4, 4).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(weights, (q @ k.transpose(-2, -1) / 2.0).softmax(-1))  # scale 1/sqrt(head_dim)


def test_training_drops_in_the_default_path_and_is_seeded():
    dropping = _attention(0.3).train()
    plain = _attention(0.3).eval()
    x = _x(2, 12, 16)
    torch.manual_seed(5)
    a = dropping(x)
    b = dropping(x)
    torch.manual_seed(5)
    c = dropping(x)
    assert not torch.allclose(a, plain(x), atol=1e-4)  # dropping happens without return_attention too
    assert not torch.allclose(a, b, atol=1e-4)  # a new mask per call
    torch.testing.assert_close(a, c, rtol=0, atol=0)  # from torch's generator


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_training_drops_a_fraction_p_of_the_logits(p):
    attn = _attention(p).train()
    torch.manual_seed(0)
    n = 64
    _, weights = attn(_x(4, n, 16), return_attention=True)  # 4 x 4 heads x 64 x 63 = 64512 off-diagonal logits
    dropped = weights == 0
    assert abs(dropped[..., _off_diagonal(n)].float().mean().item() - p) < 0.02
    assert not dropped.diagonal(dim1=-2, dim2=-1).any()  # a query's own key is never dropped
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 4, n))  # renormalised by the softmax
    # independent masks per sample, head and query
    assert (dropped[0, 0] != dropped[0, 1]).any() and (dropped[0, 0] != dropped[1, 0]).any()
    assert (dropped[0, 0, 0] != dropped[0, 0, 1]).any()


def test_dropkey_masks_logits_before_the_softmax():
    attn = _attention(0.5).train()
    torch.manual_seed(3)
    x = _x(2, 12, 16)
    out, weights = attn(x, return_attention=True)
    dropped = weights == 0
    assert dropped.float().mean() > 0.3
    q, k, v = attn.qkv(x).reshape(2, 12, 3, 4, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / 2.0
    expected = logits.masked_fill(dropped, float("-inf")).softmax(-1)  # softmax over the kept logits only
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, attn.proj((weights @ v).transpose(1, 2).reshape(2, 12, 16)))


@pytest.mark.parametrize("p", [0.9, 0.99])
def test_no_nan_at_high_drop_rates(p):
    attn = _attention(p).train()
    torch.manual_seed(0)
    x = _x(3, 20, 16).requires_grad_(True)
    out, weights = attn(x, return_attention=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 20))
    attn(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_errors():
    with pytest.raises(ValueError, match="divisible"):
        DropKeyAttention(10, 4)
    with pytest.raises(ValueError, match="p must be"):
        DropKeyAttention(16, 4, p=1.0)
    with pytest.raises(ValueError, match=r"x of shape \(B, L, 16\).*\(2, 5, 8\)"):
        _attention(0.1)(torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match=r"x of shape"):
        TransformerEncoder(16, 1, 4)(torch.zeros(5, 16))
    with pytest.raises(ValueError, match="dropkey_mode"):
        TransformerEncoder(16, 1, 4, dropkey=0.3, dropkey_mode="quadratic")
    with pytest.raises(ValueError, match="dropkey must be"):
        TransformerEncoder(16, 1, 4, dropkey=-0.1)


# --------------------------------------------------------------------------- encoders


def test_xray_vit_shapes_and_attention():
    torch.manual_seed(0)
    model = XrayViT(**SMALL_VIT).eval()
    assert model.grid == (4, 4) and model.n_patches == 16
    images = _x(2, 1, 32, 32)
    out = model(images)
    assert set(out) == {"pooled", "tokens"}
    assert out["tokens"].shape == (2, 17, 32) and out["pooled"].shape == (2, 32)
    torch.testing.assert_close(out["pooled"], out["tokens"][:, 0])  # pooled = the CLS output
    with_attention = model(images, return_attention=True)
    torch.testing.assert_close(with_attention["tokens"], out["tokens"], rtol=1e-5, atol=1e-5)
    attention = with_attention["attention"]
    assert len(attention) == 2 and all(a.shape == (2, 4, 17, 17) for a in attention)
    rgb = XrayViT(**SMALL_VIT, in_channels=3)
    assert rgb(_x(1, 3, 32, 32))["tokens"].shape == (1, 17, 32)


def test_ecg_transformer_shapes_and_token_count():
    torch.manual_seed(0)
    model = ECGTransformer(**SMALL_ECG).eval()
    out = model(_x(2, 12, 100), return_attention=True)
    assert model.n_patches == 20
    assert out["tokens"].shape == (2, 21, 32) and out["pooled"].shape == (2, 32)
    assert len(out["attention"]) == 2 and out["attention"][0].shape == (2, 4, 21, 21)
    paper = ECGTransformer(dim=16, depth=1, n_heads=2)  # 12 x 1000 samples, patch 5
    assert paper.n_patches == 200
    assert paper(_x(1, 12, 1000))["tokens"].shape == (1, 201, 16)


def test_default_sizes_are_vit_b16():
    with torch.device("meta"):  # no memory, no init cost
        xray, rgb, ecg = XrayViT(), XrayViT(in_channels=3), ECGTransformer()
    d, blocks = 768, 12
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    body = blocks * per_block + 2 * d  # + final LayerNorm
    assert xray.grid == (14, 14) and xray.n_patches == 196 and ecg.n_patches == 200
    assert _n_params(xray) == body + (16 * 16 * d + d) + 197 * d + d
    assert _n_params(rgb) == 85_798_656  # timm's vit_base_patch16_224 without its classifier
    assert _n_params(ecg) == body + (12 * 5 * d + d) + 201 * d + d
    assert [b.attn.p for b in xray.encoder.blocks] == [0.3] * 12  # the public code's DropKey


def test_patch_tokens_follow_the_patch_order():
    torch.manual_seed(0)
    vit = XrayViT(**SMALL_VIT).eval()
    vit.encoder = _PassThrough()
    images = _x(1, 1, 32, 32)
    changed = images.clone()
    changed[0, 0, 8:16, 16:24] += 1.0  # the patch in grid row 1, column 2
    delta = (vit(changed)["tokens"] - vit(images)["tokens"]).abs().sum(-1)[0]
    assert delta.nonzero().flatten().tolist() == [1 + 1 * 4 + 2]  # row-major, after the CLS token
    ecg = ECGTransformer(**SMALL_ECG).eval()
    ecg.encoder = _PassThrough()
    signals = _x(1, 12, 100)
    changed = signals.clone()
    changed[0, 7, 35:40] += 1.0  # samples of token 7
    delta = (ecg(changed)["tokens"] - ecg(signals)["tokens"]).abs().sum(-1)[0]
    assert delta.nonzero().flatten().tolist() == [1 + 7]


@pytest.mark.parametrize("name", ["xray", "ecg"])
def test_gradients_reach_every_parameter_with_dropkey(name):
    torch.manual_seed(0)
    if name == "xray":
        model, x = XrayViT(**SMALL_VIT, dropkey=0.3, dropkey_mode="linear"), _x(2, 1, 32, 32)
    else:
        model, x = ECGTransformer(**SMALL_ECG, dropkey=0.3), _x(2, 12, 100)
    model.train()
    out = model(x)
    (out["pooled"].pow(2).sum() + out["tokens"][:, 1:].mean()).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, pname


def test_encoder_input_errors():
    vit, ecg = XrayViT(**SMALL_VIT), ECGTransformer(**SMALL_ECG)
    with pytest.raises(ValueError, match=r"images of shape \(B, 1, 32, 32\).*\(2, 3, 32, 32\)"):
        vit(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images of shape .*\(1, 32, 32\)"):
        vit(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"images .*torch.int64"):
        vit(torch.zeros(2, 1, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"signals of shape \(B, 12, 100\).*\(2, 8, 100\)"):
        ecg(torch.zeros(2, 8, 100))
    with pytest.raises(ValueError, match=r"signals of shape .*\(2, 12, 1000\)"):
        ecg(torch.zeros(2, 12, 1000))
    with pytest.raises(ValueError, match="image_size"):
        XrayViT(image_size=30, patch_size=8, dim=32, depth=1, n_heads=4)
    with pytest.raises(ValueError, match="n_samples"):
        ECGTransformer(n_samples=1001, patch_size=5, dim=32, depth=1, n_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        ECGTransformer(patch_size=0, dim=32, depth=1, n_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        XrayViT(**{**SMALL_VIT, "n_heads": 5})


# --------------------------------------------------------------------------- attention rollout


def test_rollout_matches_a_hand_computation():
    # layer 1: heads [[1, 0], [0, 1]] and [[0, 1], [0, 1]] -> mean [[.5, .5], [0, 1]]
    #          + I, rows normalised -> [[.75, .25], [0, 1]]
    # layer 2: one head [[1, 0], [.5, .5]] -> + I, normalised -> [[1, 0], [.25, .75]]
    # rollout = A2' A1' = [[.75, .25], [.1875, .8125]]; the CLS row without CLS: [.25]
    # (the other order, A1' A2', would give [.1875])
    a1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]
    a2 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]] * 2)[None]  # both heads the same
    full = attention_rollout([a1, a2], full=True)
    torch.testing.assert_close(full, torch.tensor([[[0.75, 0.25], [0.1875, 0.8125]]]))
    torch.testing.assert_close(attention_rollout([a1, a2]), torch.tensor([[0.25]]))


def test_rollout_rows_sum_to_one_on_real_attention():
    torch.manual_seed(0)
    model = XrayViT(**SMALL_VIT).eval()
    with torch.no_grad():
        attention = model(_x(3, 1, 32, 32), return_attention=True)["attention"]
    full = attention_rollout(attention, full=True)
    assert full.shape == (3, 17, 17) and (full >= 0).all()
    torch.testing.assert_close(full.sum(-1), torch.ones(3, 17))
    cls_row = attention_rollout(attention)
    assert cls_row.shape == (3, 16)
    torch.testing.assert_close(cls_row, full[:, 0, 1:])
    heat = rollout_map_2d(cls_row, model.grid)
    assert heat.shape == (3, 4, 4)
    torch.testing.assert_close(heat[:, 1, 2], cls_row[:, 1 * 4 + 2])


def test_rollout_of_identity_and_uniform_attention():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), torch.zeros(2, 4))  # CLS only sees itself
    uniform = torch.full((2, 3, 5, 5), 0.2)
    row = attention_rollout([uniform, uniform])
    # (U + I) / 2 per layer, squared: CLS keeps 0.25 + 0.75 * 0.2, each token gets 0.75 * 0.2 = 0.15
    torch.testing.assert_close(row, torch.full((2, 4), 0.15))


def test_rollout_discard_ratio_drops_the_smallest_weights_but_not_the_diagonal():
    a = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.4, 0.5, 0.1]])[None, None]
    # ratio 0.4 of 3 -> 1 weight per row: row 0 loses 0.2 -> [.5, .3, 0] + I -> [1.5, .3, 0] / 1.8
    torch.testing.assert_close(attention_rollout([a], discard_ratio=0.4), torch.tensor([[0.3 / 1.8, 0.0]]))
    full = attention_rollout([a], discard_ratio=0.4, full=True)
    assert full[0, 2, 2] > 0 and full[0, 2, 0] == 0  # row 2: its smallest is the diagonal, kept; 0.4 goes
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 3))
    torch.testing.assert_close(attention_rollout([a], discard_ratio=0.0), attention_rollout([a]))


def test_rollout_maps():
    row = torch.arange(12.0).reshape(1, 12)
    torch.testing.assert_close(rollout_map_2d(row, (3, 4))[0, 2], torch.tensor([8.0, 9.0, 10.0, 11.0]))
    over_time = rollout_over_time(torch.tensor([[1.0, 2.0, 3.0]]), patch_size=2, n_samples=6)
    torch.testing.assert_close(over_time, torch.tensor([[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]))
    torch.manual_seed(0)
    model = ECGTransformer(**SMALL_ECG).eval()
    with torch.no_grad():
        attention = model(_x(2, 12, 100), return_attention=True)["attention"]
    curve = rollout_over_time(attention_rollout(attention), model.patch_size, model.n_samples)
    assert curve.shape == (2, 100)
    torch.testing.assert_close(curve[:, 35:40], attention_rollout(attention)[:, 7:8].expand(2, 5))


def test_rollout_errors():
    with pytest.raises(ValueError, match="attentions"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"attentions\[1\]"):
        attention_rollout([torch.ones(1, 2, 3, 3), torch.ones(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="attentions"):
        attention_rollout(torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout([torch.ones(1, 2, 3, 3)], discard_ratio=1.0)
    with pytest.raises(ValueError, match=r"rollout of shape \(B, 12\)"):
        rollout_map_2d(torch.ones(1, 10), (3, 4))
    with pytest.raises(ValueError, match="grid"):
        rollout_map_2d(torch.ones(1, 12), (12,))
    with pytest.raises(ValueError, match=r"rollout of shape \(B, 3\)"):
        rollout_over_time(torch.ones(1, 4), patch_size=2, n_samples=6)
    with pytest.raises(ValueError, match="n_samples"):
        rollout_over_time(torch.ones(1, 3), patch_size=2, n_samples=7)
